/* The methods of the table, one `extern const tm_method` per entry, defined in this folder (one
 * file per method or method family). method_table.c lists them. C11. */
#ifndef TM_MERGE_METHODS_METHODS_H
#define TM_MERGE_METHODS_METHODS_H

#include "merge/method.h"

extern const tm_method tm_method_simple_average;   /* average.c */
extern const tm_method tm_method_weighted_average; /* average.c */
extern const tm_method tm_method_task_arithmetic;  /* task_arithmetic.c */
extern const tm_method tm_method_ties;             /* ties.c (ties_global.c) */
extern const tm_method tm_method_dare_linear;      /* dare.c */
extern const tm_method tm_method_dare_ties;        /* dare.c */
extern const tm_method tm_method_breadcrumbs;      /* breadcrumbs.c */
extern const tm_method tm_method_breadcrumbs_ties; /* breadcrumbs.c */
extern const tm_method tm_method_della;            /* della.c */
extern const tm_method tm_method_della_linear;     /* della.c */
extern const tm_method tm_method_slerp;            /* slerp.c */
extern const tm_method tm_method_model_stock;      /* model_stock.c */

#endif
