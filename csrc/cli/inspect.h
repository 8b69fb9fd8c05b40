/* `torchmerge inspect`: a checkpoint's tensors as a table or as JSON (quantized tensors with
 * their scheme, scale and zero point), or the state dicts a nested checkpoint holds. C11. */
#ifndef TM_CLI_INSPECT_H
#define TM_CLI_INSPECT_H

#include <stdio.h>

#include "torchmerge.h"

/* Both return 0, or -1 when writing to out failed. */
int tm_cli_inspect_text(const tm_checkpoint *ck, FILE *out);
int tm_cli_inspect_json(const tm_checkpoint *ck, FILE *out);
/* A checkpoint holding several state dicts: each with its --key and tensor count (as a table or
 * JSON). 0, -1 when writing failed, 1 when an error was reported on stderr. */
int tm_cli_inspect_candidates(const char *path, int json, FILE *out);

#endif
