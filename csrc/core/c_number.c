#define _GNU_SOURCE
#include "core/c_number.h"

#include <locale.h>
#include <pthread.h>
#include <stdlib.h>

static locale_t c_locale;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static void make_c_locale(void) { c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0); }

double tm_strtod_c(const char *s, char **end) {
    pthread_once(&once, make_c_locale);
    return c_locale ? strtod_l(s, end, c_locale) : strtod(s, end);
}
