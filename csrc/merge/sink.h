/* Output sinks: one file per output format. The pipeline hands a sink the merged bytes of each
 * unit, in the sink's order, on the thread that called tm_merge_files (so signal handlers never
 * race a file being created): begin(unit), write(bytes)..., end(unit). Opening, committing and
 * aborting are each format's own, inside its tm_sink_*_write function below, which the entry
 * point calls. C11. */
#ifndef TM_MERGE_SINK_H
#define TM_MERGE_SINK_H

#include <stdint.h>

#include "merge/merge_ctx.h"
#include "merge/output_metadata.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_sink {
    void *self;
    int want_crc; /* zip outputs: the merging threads checksum each block while it is in cache */
    tm_status (*begin)(void *self, size_t unit, tm_error *err);                               /* or NULL */
    tm_status (*write)(void *self, const void *data, size_t len, uint32_t crc, tm_error *err);
    tm_status (*end)(void *self, size_t unit, tm_error *err);                                 /* or NULL */
} tm_sink;

/* torch.save zip (sink_pt.c). */
tm_status tm_sink_pt_write(merge_ctx *c, const char *output, tm_error *err);

/* TorchScript by rewriting the template archive record by record, without LibTorch
 * (sink_torchscript.c). Sets *applicable = 0 and writes nothing when the merged tensors do not
 * fit the template's records as they are (then tm_sink_torchscript_libtorch_write). */
tm_status tm_sink_torchscript_write(merge_ctx *c, const char *module, const char *output, int *applicable,
                                    tm_error *err);

/* TorchScript through LibTorch's module writer (sink_torchscript_libtorch.c). */
tm_status tm_sink_torchscript_libtorch_write(merge_ctx *c, const char *module, const char *output, tm_error *err);

/* One safetensors file (sink_safetensors.c). */
tm_status tm_sink_safetensors_write(merge_ctx *c, const char *output, const tm_output_metadata *m, tm_error *err);
/* Units [u0, u1) as one safetensors file on fd (label names it in messages); *done counts the
 * units written, for the progress bar over several shards. */
tm_status tm_sink_safetensors_units(merge_ctx *c, int fd, const char *label, size_t u0, size_t u1,
                                    const tm_output_metadata *m, size_t *done, tm_error *err);

/* A sharded Hugging Face folder (sink_safetensors_folder.c). */
tm_status tm_sink_safetensors_folder_write(merge_ctx *c, const char *output, const tm_output_metadata *m,
                                           tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
