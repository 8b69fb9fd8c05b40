// serve: loads a merged TorchScript module and runs inference, with LibTorch only.
//
//   serve MODEL.pt INPUT.pt
//
// MODEL.pt is a TorchScript module, e.g. a soup written by the torchmerge CLI
//   (torchmerge simple_average -o soup.pt model_a_scripted.pt model_b_scripted.pt);
// INPUT.pt a tensor saved with torch.save(x, "input.pt"). Prints the output's shape, then one
// line per row: its values and argmax. The merged file is an ordinary TorchScript module:
// serving it needs neither torchmerge nor its ops library, only LibTorch (built as target
// example_serve in tests/ops/CMakeLists.txt: target_link_libraries(... ${TORCH_LIBRARIES})).
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/script.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error(path + ": cannot open");
    return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

std::string shape_of(const at::Tensor &t) {
    std::string s = "[";
    for (int64_t d = 0; d < t.dim(); d++) s += (d ? ", " : "") + std::to_string(t.size(d));
    return s + "]";
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s MODEL.pt INPUT.pt\n", argv[0]);
        return 2;
    }
    try {
        torch::jit::Module model = torch::jit::load(argv[1], at::kCPU);
        model.eval();
        at::Tensor input = torch::jit::pickle_load(read_file(argv[2])).toTensor();

        c10::InferenceMode guard;  // no autograd bookkeeping while serving
        at::Tensor output = model.forward({input}).toTensor().to(at::kDouble).contiguous();

        std::printf("input shape: %s\n", shape_of(input).c_str());
        std::printf("output shape: %s\n", shape_of(output).c_str());
        at::Tensor rows = output.reshape({output.size(0), -1});
        for (int64_t i = 0; i < rows.size(0); i++) {
            std::printf("row %lld:", static_cast<long long>(i));
            for (int64_t j = 0; j < rows.size(1); j++) std::printf(" %.17g", rows[i][j].item<double>());
            std::printf(" argmax %lld\n", static_cast<long long>(rows[i].argmax().item<int64_t>()));
        }
    } catch (const c10::Error &e) {
        std::fprintf(stderr, "serve: %s\n", e.what_without_backtrace());
        return 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "serve: %s\n", e.what());
        return 1;
    }
    return 0;
}
