/* `torchmerge inspect`: a checkpoint's tensors as a table or as JSON. C11. */
#ifndef TM_CLI_INSPECT_H
#define TM_CLI_INSPECT_H

#include <stdio.h>

#include "torchmerge.h"

/* Both return 0, or -1 when writing to out failed. */
int tm_cli_inspect_text(const tm_checkpoint *ck, FILE *out);
int tm_cli_inspect_json(const tm_checkpoint *ck, FILE *out);

#endif
