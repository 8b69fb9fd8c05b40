/* tm_byte_size_parse: the one size grammar of --max-shard-size and recipes' max_shard_size.
 * K/M/G/T (with or without B) are powers of 1000, as Hugging Face's max_shard_size counts;
 * KiB/MiB/GiB/TiB are powers of 1024. C11. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <strings.h>

#include "core/c_number.h"
#include "core/error.h"
#include "torchmerge.h"

tm_status tm_byte_size_parse(const char *text, uint64_t *out) {
    tm_error err = {0};
    static const struct { const char *unit; double scale; } units[] = {
        {"", 1},       {"B", 1},       {"K", 1e3},           {"KB", 1e3},          {"M", 1e6},
        {"MB", 1e6},   {"G", 1e9},     {"GB", 1e9},          {"T", 1e12},          {"TB", 1e12},
        {"KiB", 1024.0}, {"MiB", 1048576.0}, {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
    if (text && out) {
        char *end;
        errno = 0;
        double v = tm_strtod_c(text, &end);
        if (end != text && !errno && isfinite(v) && v > 0) {
            while (*end == ' ') end++;
            for (size_t i = 0; i < sizeof units / sizeof *units; i++) {
                double bytes = v * units[i].scale;
                /* 2^64 itself does not fit: the largest double below it is the limit */
                if (strcasecmp(end, units[i].unit) == 0 && bytes >= 1 && bytes < 18446744073709551616.0) {
                    *out = (uint64_t)bytes;
                    return TM_OK;
                }
            }
        }
    }
    tm_error_set(&err, TM_ERROR_INVALID_ARGUMENT, "expected a size in bytes such as 500MB, 2GB, 2GiB or 5e9, got '%s'",
                 text ? text : "(null)");
    return tm_error_publish(&err);
}
