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
#ifdef TM_WITH_GLOO
    torchmerge::dist_open,      torchmerge::dist_exchange,    torchmerge::dist_start, torchmerge::dist_send,
    torchmerge::dist_recv,      torchmerge::dist_broadcast,   torchmerge::dist_check_world,
    torchmerge::dist_abort,     torchmerge::dist_close,
#else
    nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
#endif
};
}  // namespace

extern "C" __attribute__((visibility("default"))) const tm_torch_bridge *tm_torch_bridge_v1(void) {
    return &kBridge;
}
