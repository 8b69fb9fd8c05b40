// The one exported symbol of libtorchmerge_torch: the table the C core finds with dlsym.
#include "torch/bridge_impl.h"

namespace {
const tm_torch_bridge kBridge = {
    TM_TORCH_BRIDGE_ABI,
    torchmerge::mw_open,   torchmerge::mw_has,   torchmerge::mw_set,    torchmerge::mw_commit,
    torchmerge::mw_free,   torchmerge::sd_new,   torchmerge::sd_load,   torchmerge::sd_clone,
    torchmerge::sd_free,   torchmerge::sd_size,  torchmerge::sd_tensor, torchmerge::sd_find,
    torchmerge::sd_set,    torchmerge::sd_add,   torchmerge::sd_mul,    torchmerge::sd_save,
    torchmerge::score_module,
};
}  // namespace

extern "C" __attribute__((visibility("default"))) const tm_torch_bridge *tm_torch_bridge_v1(void) {
    return &kBridge;
}
