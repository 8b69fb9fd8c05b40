// merge_files: tm_merge_files (the streaming file merge behind the CLI) as a torch op, through
// the public C API only. Failures become RuntimeError with tm_errmsg()'s message; warnings
// (e.g. integer tensors that differ between inputs) become Python warnings via TORCH_WARN.
#include <torch/library.h>

#include <string>
#include <vector>

#include "torchmerge.h"

namespace torchmerge {
namespace ops {
namespace {

void on_warning(void *, const char *message) { TORCH_WARN("merge_files: ", message); }

void merge_files(const c10::List<std::string> &inputs, const std::string &output,
                 c10::optional<at::ArrayRef<double>> weights) {
    std::vector<std::string> paths(inputs.begin(), inputs.end());
    std::vector<const char *> argv;
    argv.reserve(paths.size());
    for (const auto &p : paths) argv.push_back(p.c_str());
    tm_merge_options opts;
    tm_merge_options_init(&opts);
    tm_param w = {"weights", nullptr, nullptr, 0};
    if (weights) {
        w.numbers = weights->data();
        w.n_numbers = weights->size();
        opts.method = "weighted_average";
        opts.params = &w;
        opts.n_params = 1;
    }
    opts.warning = on_warning;
    tm_status st = tm_merge_files(argv.data(), argv.size(), output.c_str(), &opts);
    TORCH_CHECK(st == TM_OK, "merge_files: ", tm_errmsg());
}

}  // namespace
}  // namespace ops
}  // namespace torchmerge

TORCH_LIBRARY_IMPL(torchmerge, CompositeImplicitAutograd, m) {
    m.impl("merge_files", TORCH_FN(torchmerge::ops::merge_files));
}
