/* `torchmerge METHOD [method parameters] [options] -o OUT INPUT...` for every method of the
 * table: its flags (--NAME VALUE; --NAME / --no-NAME for true/false parameters) and its --help
 * come from the method's parameter declarations (tm_method_param), so a new method needs
 * nothing here. C11, over the public C API only. */
#define _GNU_SOURCE
#include "cli/merge_command.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_common.h"

enum { OPT_FORMAT = 256, OPT_BASE, OPT_TEMPLATE, OPT_DTYPE, OPT_KEYS, OPT_KEY, OPT_PROFILE, OPT_MAX_SHARD, OPT_MASKS_OUT,
       OPT_DEQUANTIZE, OPT_DISTRIBUTED, OPT_RANK, OPT_WORLD_SIZE, OPT_MASTER_ADDR, OPT_MASTER_PORT, OPT_TIMEOUT,
       OPT_OUTPUT_ON, OPT_PARAM = 512 };

static const struct option common_options[] = {
    {"output", required_argument, 0, 'o'},      {"format", required_argument, 0, OPT_FORMAT},
    {"base", required_argument, 0, OPT_BASE},         {"masks-out", required_argument, 0, OPT_MASKS_OUT},
    {"template", required_argument, 0, OPT_TEMPLATE}, {"dtype", required_argument, 0, OPT_DTYPE},
    {"keys", required_argument, 0, OPT_KEYS},   {"key", required_argument, 0, OPT_KEY},
    {"profile", no_argument, 0, OPT_PROFILE},   {"max-shard-size", required_argument, 0, OPT_MAX_SHARD},
    {"dequantize", no_argument, 0, OPT_DEQUANTIZE},
    {"quiet", no_argument, 0, 'q'},             {"help", no_argument, 0, 'h'},
    {"distributed", no_argument, 0, OPT_DISTRIBUTED}, {"rank", required_argument, 0, OPT_RANK},
    {"world-size", required_argument, 0, OPT_WORLD_SIZE}, {"master-addr", required_argument, 0, OPT_MASTER_ADDR},
    {"master-port", required_argument, 0, OPT_MASTER_PORT}, {"timeout", required_argument, 0, OPT_TIMEOUT},
    {"output-on", required_argument, 0, OPT_OUTPUT_ON}};
#define N_COMMON (sizeof common_options / sizeof *common_options)

/* "normalize" → "normalize", "majority_sign" → "majority-sign" (into buf). */
static const char *flag_name(const char *param, char *buf, size_t cap, const char *prefix) {
    snprintf(buf, cap, "%s%s", prefix, param);
    for (char *p = buf; *p; p++)
        if (*p == '_') *p = '-';
    return buf;
}

void tm_cli_print_method_options(FILE *f, size_t method) {
    tm_method_info m;
    tm_method_info_init(&m);
    if (tm_method_get(method, &m) != TM_OK) return;
    for (size_t j = 0; j < m.n_params; j++) {
        tm_method_param_info p;
        tm_method_param_info_init(&p);
        if (tm_method_param(method, j, &p) != TM_OK) continue;
        char flag[96], left[256];
        flag_name(p.name, flag, sizeof flag, "--");
        if (p.kind == TM_PARAM_BOOL) snprintf(left, sizeof left, "%s / --no-%s", flag, flag + 2);
        else if (p.kind == TM_PARAM_CHOICE) snprintf(left, sizeof left, "%s %s", flag, p.choices);
        else if (p.per_input) snprintf(left, sizeof left, "%s V1,V2,...", flag);
        else snprintf(left, sizeof left, "%s V", flag);
        fprintf(f, "  %-24s%s%s", left, strlen(left) > 23 ? "\n                          " : "", p.help);
        if (p.required) fprintf(f, " (required)");
        else fprintf(f, " (default %s)", p.default_value);
        if (p.kind == TM_PARAM_NUMBER || p.kind == TM_PARAM_INTEGER) {
            if (p.min > -1e308 && p.max < 1e308)
                fprintf(f, "; in %c%g, %g%c", p.min_exclusive ? '(' : '[', p.min, p.max, p.max_exclusive ? ')' : ']');
            else if (p.min > -1e308)
                fprintf(f, "; %s %g", p.min_exclusive ? ">" : ">=", p.min);
        }
        fputc('\n', f);
    }
}

void tm_cli_print_common_options(FILE *f) {
    fprintf(f,
            "  -o, --output OUT        output file (written to a temporary file, renamed on success)\n"
            "  --base BASE             the base (pre-trained) model, for methods on task vectors\n"
            "                          (input - base); non-floating tensors then come from it\n"
            "  --masks-out FILE        methods that drop task-vector elements (DARE, TIES,\n"
            "                          Breadcrumbs, DELLA): also write their boolean keep-masks to\n"
            "                          FILE (safetensors; \"{input}.{tensor}\", input from 0)\n"
            "  --format pt|torchscript|safetensors\n"
            "                          output format (default: safetensors when OUT ends in\n"
            "                          .safetensors or is a folder (existing, or ending in '/'),\n"
            "                          which gets sharded safetensors + index.json; torchscript\n"
            "                          when the inputs are modules or --template is given; else pt)\n"
            "  --max-shard-size SIZE   folder output: largest shard, in bytes; K, M, G, T (or KB,\n"
            "                          MB, GB, TB) are powers of 1000 as Hugging Face counts them,\n"
            "                          KiB, MiB, GiB, TiB powers of 1024; 5e9 works; default 5GiB\n"
            "  --template MODULE       TorchScript module to fill with the merged weights\n"
            "  --dtype DTYPE           write floating tensors as float32|float16|bfloat16|float64\n"
            "                          (default: each tensor's dtype in the first input)\n"
            "  --dequantize            merge quantized tensors (qint8, quint8, qint32) as their real\n"
            "                          values scale*(q - zero_point), written as float32 (or\n"
            "                          --dtype); without it they are refused\n"
            "  --keys strict|intersection|union\n"
            "                          which tensor names to merge (default strict: all inputs must\n"
            "                          have the same names; union merges each name over the inputs\n"
            "                          that have it)\n"
            "  --key NAME              state dict inside nested checkpoints (e.g. state_dict,\n"
            "                          model.ema); found automatically when unambiguous\n"
            "  --profile               print time spent loading, merging and saving\n"
            "  -q, --quiet             no warnings, no progress bar\n"
            "\ndistributed (merge the inputs of several hosts over torch.distributed's Gloo;\n"
            "docs/distributed.md; every rank runs the same command with its own INPUTs, maybe none):\n"
            "  --distributed           this process is one rank of a distributed merge\n"
            "  --rank R, --world-size W, --master-addr HOST, --master-port PORT\n"
            "                          default: $RANK, $WORLD_SIZE, $MASTER_ADDR, $MASTER_PORT (as\n"
            "                          torchrun sets them); Gloo's interface: $GLOO_SOCKET_IFNAME\n"
            "  --timeout SECONDS       bounds the rendezvous and every exchange (default 300)\n"
            "  --output-on 0|all       rank 0 writes OUT (default), or every rank does\n");
}

static void method_usage(FILE *f, size_t method) {
    tm_method_info m;
    tm_method_info_init(&m);
    tm_method_get(method, &m);
    fprintf(f, "usage: torchmerge %s [parameters] [options]%s -o OUT INPUT...\n\n%s: %s\n", m.name,
            m.needs_base ? " --base BASE" : "", m.name, m.summary);
    for (size_t k = 0; m.aliases[k]; k++) fprintf(f, "%s%s", k ? ", " : "Also called: ", m.aliases[k]);
    if (m.aliases[0]) fprintf(f, ".\n");
    fprintf(f, "\nparameters:\n");
    if (!m.n_params) fprintf(f, "  (none)\n");
    tm_cli_print_method_options(f, method);
    fprintf(f, "\noptions:\n");
    tm_cli_print_common_options(f);
    fprintf(f,
            "\nFloating tensors are computed in float64 and rounded once; integer and bool tensors\n"
            "(e.g. num_batches_tracked) are taken from the first input.\n");
}

/* The long options of method: the common ones, then its parameters (index OPT_PARAM + 2j for
 * --NAME, + 2j + 1 for --no-NAME). Names are kept in names (one 96-byte slot per option). */
static struct option *method_options(size_t method, const tm_method_info *m, char (*names)[96]) {
    struct option *all = calloc(N_COMMON + 2 * m->n_params + 1, sizeof *all);
    if (!all) return NULL;
    memcpy(all, common_options, sizeof common_options);
    size_t k = N_COMMON;
    for (size_t j = 0; j < m->n_params; j++) {
        tm_method_param_info p;
        tm_method_param_info_init(&p);
        tm_method_param(method, j, &p);
        int is_bool = p.kind == TM_PARAM_BOOL;
        all[k++] = (struct option){flag_name(p.name, names[2 * j], 96, ""), is_bool ? no_argument : required_argument,
                                   0, OPT_PARAM + 2 * (int)j};
        if (is_bool)
            all[k++] = (struct option){flag_name(p.name, names[2 * j + 1], 96, "no-"), no_argument, 0,
                                       OPT_PARAM + 2 * (int)j + 1};
    }
    return all;
}

int tm_cli_merge(int argc, char **argv, size_t method) {
    tm_method_info m;
    tm_method_info_init(&m);
    if (tm_method_get(method, &m) != TM_OK) return tm_cli_usage_error("torchmerge --help", "%s", tm_errmsg());
    char help[160];
    snprintf(help, sizeof help, "torchmerge %s --help", m.name);
    char (*names)[96] = calloc(2 * m.n_params + 1, sizeof *names);
    tm_param *params = calloc(m.n_params + 1, sizeof *params);
    struct option *longopts = names ? method_options(method, &m, names) : NULL;
    if (!names || !params || !longopts) {
        free(names), free(params), free(longopts);
        tm_cli_error("out of memory");
        return TM_EXIT_FAILED;
    }
    tm_merge_options o;
    tm_merge_options_init(&o);
    o.method = m.name;
    const char *output = NULL;
    int profile = 0, c, rc = -1;
    size_t n_params = 0;
    tm_profile prof;
    tm_profile_init(&prof);
    tm_distributed_options dist;
    tm_distributed_options_init(&dist);
    int distributed = 0;
    optind = 1;
    opterr = 0;
    while (rc < 0 && (c = getopt_long(argc, argv, ":o:qh", longopts, NULL)) != -1) {
        switch (c) {
        case 'o': output = optarg; break;
        case 'q': tm_cli_quiet = 1; break;
        case 'h': method_usage(stdout, method); rc = 0; break;
        case OPT_FORMAT: if ((c = tm_cli_set_format(&o, optarg, help))) rc = c; break;
        case OPT_MAX_SHARD:
            if (tm_byte_size_parse(optarg, &o.max_shard_size) != TM_OK)
                rc = tm_cli_usage_error(help, "--max-shard-size: %s", tm_errmsg());
            break;
        case OPT_TEMPLATE: o.template_path = optarg; break;
        case OPT_BASE: o.base = optarg; break;
        case OPT_MASKS_OUT: o.masks_out = optarg; break;
        case OPT_DEQUANTIZE: o.dequantize = 1; break;
        case OPT_DTYPE: if ((c = tm_cli_set_dtype(&o, optarg, help))) rc = c; break;
        case OPT_KEYS: if ((c = tm_cli_set_keys(&o, optarg, help))) rc = c; break;
        case OPT_KEY: o.key = optarg; break;
        case OPT_PROFILE: profile = 1; break;
        case OPT_DISTRIBUTED: distributed = 1; break;
        case OPT_RANK: if ((c = tm_cli_int(optarg, "--rank", 0, 1 << 20, &dist.rank, help))) rc = c; break;
        case OPT_WORLD_SIZE:
            if ((c = tm_cli_int(optarg, "--world-size", 1, 1 << 20, &dist.world_size, help))) rc = c;
            break;
        case OPT_MASTER_ADDR: dist.master_addr = optarg; break;
        case OPT_MASTER_PORT: if ((c = tm_cli_int(optarg, "--master-port", 1, 65535, &dist.master_port, help))) rc = c; break;
        case OPT_TIMEOUT: {
            char *end;
            dist.timeout_seconds = strtod(optarg, &end);
            if (*end || !(dist.timeout_seconds > 0) || dist.timeout_seconds > 1e6)
                rc = tm_cli_usage_error(help, "--timeout: '%s' is not a number of seconds in (0, 1e6]", optarg);
            break;
        }
        case OPT_OUTPUT_ON:
            if (strcmp(optarg, "all") == 0) dist.output_on_all = 1;
            else if (strcmp(optarg, "0") != 0) rc = tm_cli_usage_error(help, "--output-on: '%s' is neither 0 nor all", optarg);
            break;
        case ':': rc = tm_cli_usage_error(help, "option '%s' needs a value", argv[optind - 1]); break;
        case '?': rc = tm_cli_usage_error(help, "unknown option '%s'", argv[optind - 1]); break;
        default: {
            size_t j = (size_t)(c - OPT_PARAM) / 2;
            tm_method_param_info p;
            tm_method_param_info_init(&p);
            tm_method_param(method, j, &p);
            const char *text = p.kind == TM_PARAM_BOOL ? ((c - OPT_PARAM) % 2 ? "false" : "true") : optarg;
            size_t k = 0;
            while (k < n_params && strcmp(params[k].name, p.name) != 0) k++;
            params[k] = (tm_param){p.name, text, NULL, 0}; /* the last one given wins */
            if (k == n_params) n_params++;
        }
        }
    }
    int n = argc - optind;
    if (rc < 0 && !output) rc = tm_cli_usage_error(help, "missing -o OUT");
    if (rc < 0 && n < 1 && !distributed) rc = tm_cli_usage_error(help, "no input files");
    if (rc < 0 && !distributed && (dist.rank >= 0 || dist.world_size || dist.master_addr || dist.master_port ||
                                   dist.timeout_seconds > 0 || dist.output_on_all))
        rc = tm_cli_usage_error(help, "--rank, --world-size, --master-addr, --master-port, --timeout and --output-on "
                                      "need --distributed");
    if (rc < 0) {
        if (distributed) o.distributed = &dist;
        /* c10d logs its own errors through glog before ours: keep stderr to our one line. */
        if (distributed) setenv("GLOG_minloglevel", "3", 0);
        o.params = params;
        o.n_params = n_params;
        tm_cli_set_callbacks(&o);
        if (profile) o.profile = &prof;
        tm_cli_install_signal_handlers();
        if (tm_merge_files((const char *const *)(argv + optind), (size_t)n, output, &o) != TM_OK) {
            tm_cli_error("%s", tm_errmsg());
            rc = TM_EXIT_FAILED;
        } else {
            if (profile) tm_cli_print_profile(&prof);
            rc = 0;
        }
    }
    free(names);
    free(params);
    free(longopts);
    return rc;
}
