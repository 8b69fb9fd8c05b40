// The functions libtorchmerge_torch exposes to the C core through its bridge table
// (csrc/core/torch_bridge.h). C++17.
#pragma once

#include "core/torch_bridge.h"

namespace torchmerge {

tm_status sd_new(tm_state_dict **out, tm_error *err);
tm_status sd_load(const char *path, const tm_open_options *opts, tm_state_dict **out, tm_error *err);
tm_status sd_clone(const tm_state_dict *sd, tm_state_dict **out, tm_error *err);
void sd_free(tm_state_dict *sd);
size_t sd_size(const tm_state_dict *sd);
tm_status sd_tensor(const tm_state_dict *sd, size_t i, tm_tensor_info *out, tm_error *err);
int64_t sd_find(const tm_state_dict *sd, const char *name);
tm_status sd_set(tm_state_dict *sd, const char *name, tm_dtype dtype, int32_t ndim, const int64_t *shape,
                 const void *data, tm_error *err);
tm_status sd_add(tm_state_dict *a, const tm_state_dict *b, double alpha, tm_error *err);
tm_status sd_mul(tm_state_dict *sd, double scalar, tm_error *err);
tm_status sd_save(const tm_state_dict *sd, const char *path, tm_format format, const char *template_path,
                  tm_error *err);

tm_status mw_open(const char *template_path, const char *output, int has_dtype, tm_dtype dtype,
                  tm_module_writer **out, tm_error *err);
int mw_has(const tm_module_writer *w, const char *name);
tm_status mw_set(tm_module_writer *w, const char *name, tm_dtype dtype, int32_t ndim, const int64_t *shape,
                 const int64_t *stride, int64_t offset, const void *storage, tm_error *err);
tm_status mw_commit(tm_module_writer *w, tm_error *err);
void mw_free(tm_module_writer *w);

tm_status score_module(const char *model_path, const char *eval_path, double *score, tm_error *err);

#ifdef TM_WITH_GLOO
tm_status dist_open(const tm_dist_config *cfg, tm_dist_session **out, tm_error *err);
tm_status dist_exchange(tm_dist_session *s, const char *topic, const char *mine, char ***all, tm_error *err);
tm_status dist_start(tm_dist_session *s, tm_error *err);
tm_status dist_send(tm_dist_session *s, int to, const double *data, size_t count, tm_error *err);
tm_status dist_recv(tm_dist_session *s, int from, double *data, size_t count, tm_error *err);
tm_status dist_broadcast(tm_dist_session *s, int root, double *data, size_t count, tm_error *err);
tm_status dist_check_world(tm_dist_session *s, tm_error *err);
void dist_abort(tm_dist_session *s, const char *message);
void dist_close(tm_dist_session *s);
#endif

}  // namespace torchmerge
