/* The model-wide passes of a method (tm_method.model_reduce / model_end), run once the inputs
 * are planned and before any tensor is written. C11. */
#ifndef TM_MERGE_MODEL_PASSES_H
#define TM_MERGE_MODEL_PASSES_H

#include "merge/merge_ctx.h"
#include "merge/merge_unit.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One pass over some tensors: calls tm_model_pass_tensor on each (adding into sum). */
typedef tm_status (*tm_model_pass_fn)(void *user, unsigned pass, tm_model_lists *lists, double *sum, tm_error *err);

/* The passes of c->method (none: *model = NULL at once): pass_fn for each, then model_end, until
 * it asks for no more. *model: malloc'd model state. */
tm_status tm_model_passes_run(const merge_ctx *c, double **model, tm_model_pass_fn pass_fn, void *user,
                              tm_error *err);

/* Tensor t's share of a pass: the method's prepare, then model_reduce over its blocks into sum
 * (the values it collects go to lists). */
tm_status tm_model_pass_tensor(const tm_method *m, tm_merge_worker *w, tm_method_tensor *t, unsigned pass,
                               tm_model_lists *lists, double *sum, tm_error *err);

/* Runs c->method's model passes (none: returns at once), leaving their result in c->model
 * (allocated here, freed with the context). */
tm_status tm_model_passes(merge_ctx *c, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
