#include "torch/pt_writer.h"

#include <cstdlib>

#include "formats/pickle_writer.h"
#include "torch/aten_bridge.h"

namespace torchmerge {

namespace {
// Any prefix works for torch.load; "archive" is what torch.save used before 2.x.
constexpr const char *kPrefix = "archive";
}  // namespace

PtWriter::PtWriter(const std::string &path) : path_(path) {
    tm_error err{};
    check(tm_atomic_output_open(path.c_str(), &out_, &err), err);
    open_ = true;
    tm_status st = tm_zip_writer_open(out_.fd, path.c_str(), &zip_, &err);
    if (st) {
        tm_atomic_output_abort(&out_);
        open_ = false;
        check(st, err);
    }
}

PtWriter::~PtWriter() {
    tm_zip_writer_free(zip_);
    if (open_) tm_atomic_output_abort(&out_);
}

void PtWriter::write_header(const std::vector<OutTensor> &tensors,
                            const std::vector<OutStorage> &storages) {
    storages_ = storages;
    std::vector<std::string> keys(storages.size());
    for (size_t i = 0; i < storages.size(); i++) keys[i] = std::to_string(i);
    std::vector<tm_pk_out_tensor> pk(tensors.size());
    for (size_t i = 0; i < tensors.size(); i++) {
        const OutTensor &t = tensors[i];
        pk[i].name = t.name.c_str();
        pk[i].dtype = t.dtype;
        pk[i].ndim = int32_t(t.shape.size());
        pk[i].shape = t.shape.data();
        pk[i].stride = t.stride.data();
        pk[i].storage_offset = t.storage_offset;
        pk[i].storage_key = keys[t.storage].c_str();
        pk[i].storage_numel = storages[t.storage].numel;
    }
    tm_byte_buffer buf{};
    tm_error err{};
    tm_status st = tm_pickle_write_state_dict(pk.data(), pk.size(), &buf, &err);
    if (!st) st = tm_zip_writer_add(zip_, (std::string(kPrefix) + "/data.pkl").c_str(), buf.data, buf.size, &err);
    free(buf.data);
    check(st, err);
}

void PtWriter::write_storage(size_t index, const void *data, size_t nbytes) {
    if (index != next_storage_ || index >= storages_.size())
        fail(TM_ERROR_INTERNAL, path_ + ": storages written out of order");
    const OutStorage &s = storages_[index];
    if (nbytes != uint64_t(s.numel) * tm_dtype_size(s.dtype))
        fail(TM_ERROR_INTERNAL, path_ + ": storage " + std::to_string(index) + " has the wrong size");
    tm_error err{};
    std::string name = std::string(kPrefix) + "/data/" + std::to_string(index);
    check(tm_zip_writer_add(zip_, name.c_str(), data, nbytes, &err), err);
    next_storage_++;
}

void PtWriter::commit() {
    if (next_storage_ != storages_.size()) fail(TM_ERROR_INTERNAL, path_ + ": storages missing");
    tm_error err{};
    static const char version[] = "3\n";
    check(tm_zip_writer_add(zip_, (std::string(kPrefix) + "/version").c_str(), version, 2, &err), err);
    check(tm_zip_writer_finish(zip_, &err), err);
    tm_zip_writer_free(zip_);
    zip_ = nullptr;
    open_ = false;
    check(tm_atomic_output_commit(&out_, &err), err);
}

}  // namespace torchmerge
