// Writes a torch.save archive holding a plain dict of tensors, streaming: data.pkl first
// (all metadata is known up front), then each storage record as it is produced, into a
// temporary file that is renamed over the target on commit. C++17 over the C writers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/atomic_output.h"
#include "formats/zip_writer.h"
#include "torchmerge.h"

namespace torchmerge {

struct OutStorage {
    tm_dtype dtype;
    int64_t numel;
};

struct OutTensor {
    std::string name;
    tm_dtype dtype;
    std::vector<int64_t> shape, stride;
    int64_t storage_offset = 0;
    size_t storage = 0;  // index into the storages list
};

class PtWriter {
public:
    explicit PtWriter(const std::string &path);
    ~PtWriter();  // removes the temporary file unless committed
    PtWriter(const PtWriter &) = delete;
    PtWriter &operator=(const PtWriter &) = delete;

    void write_header(const std::vector<OutTensor> &tensors, const std::vector<OutStorage> &storages);
    // Storages must be written in index order, each exactly numel * itemsize bytes.
    void write_storage(size_t index, const void *data, size_t nbytes);
    void commit();

private:
    std::string path_;
    tm_atomic_output out_{};
    tm_zip_writer *zip_ = nullptr;
    std::vector<OutStorage> storages_;
    size_t next_storage_ = 0;
    bool open_ = false;
};

}  // namespace torchmerge
