/* Numbers read the same way whatever the process locale: "0.5" is one half even where the
 * locale writes "0,5" (a program embedding the library may have called setlocale). C11. */
#ifndef TM_CORE_C_NUMBER_H
#define TM_CORE_C_NUMBER_H

/* strtod in the C locale. */
double tm_strtod_c(const char *s, char **end);

#endif
