// Merges across hosts: the rendezvous, the agreement exchanges and the float64 all-reduces of
// the block sums, over torch.distributed's c10d (TCPStore, ProcessGroupGloo) — the engine
// PyTorch users already run, no protocol of our own. Reached from the C core through the bridge
// (csrc/core/torch_bridge.h); the merge logic is in csrc/merge/distributed.c. Narrow c10d
// headers only (torch/torch.h costs ~20 s per file). C++17.
#include <arpa/inet.h>
#include <net/if.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ATen/ops/from_blob.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "torch/bridge_impl.h"

struct tm_dist_session {
    tm_dist_config cfg;
    std::string addr, ifname;
    std::chrono::milliseconds timeout;
    std::chrono::steady_clock::time_point opened;  // dist_open: a rank may join until opened + timeout
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
    bool failed = false;  // dist_abort was called: close without waiting for the others
    bool stuck = false;   // a request to rank 0's store failed after a failure: no more of them
    std::string broken;   // the first exchange that failed: later ones fail at once with it
    // Liveness, so that a rank whose exchange fails can tell which rank stopped (dead or stalled)
    // rather than blame its neighbour, whose exchange may be failing for the same reason: every
    // rank serves a TCPStore of its own (its daemon thread answers while the process runs, and
    // not once it is stopped or dead), and holds a client of every other rank's, connected while
    // all ran. Not through rank 0's store: a rank stopped in the middle of a request to a store
    // holds that store's single daemon thread until the request completes, i.e. forever, and
    // every later request to it waits out the timeout (a heartbeat through rank 0's store made the
    // survivors of a SIGSTOPped rank leave after ~5 × the timeout, about one run in eight).
    c10::intrusive_ptr<c10d::TCPStore> live;
    std::vector<c10::intrusive_ptr<c10d::TCPStore>> peers;
    // Sends in flight (each on its own copy of the data), oldest first, with their destination.
    struct pending {
        c10::intrusive_ptr<c10d::Work> work;
        at::Tensor data;
        int to;
    };
    std::deque<pending> sends;
};

namespace torchmerge {
namespace {

using Clock = std::chrono::steady_clock;

tm_status drain_sends(tm_dist_session *s, size_t keep, tm_error *err);

// The first line of an exception's message, without LibTorch's backtrace.
std::string first_line(const std::exception &e) {
    const auto *ce = dynamic_cast<const c10::Error *>(&e);
    std::string m = ce ? ce->what_without_backtrace() : e.what();
    auto nl = m.find('\n');
    return nl == std::string::npos ? m : m.substr(0, nl);
}

std::vector<uint8_t> bytes(const std::string &s) { return std::vector<uint8_t>(s.begin(), s.end()); }
std::string text(const std::vector<uint8_t> &b) { return std::string(b.begin(), b.end()); }

// What another rank said when it gave up (dist_abort), or "".
std::string abort_message(tm_dist_session *s) {
    try {
        if (!s->stuck && s->store && s->store->check({"abort"})) return text(s->store->get("abort"));
    } catch (const std::exception &) {
        s->stuck = !s->broken.empty() || s->failed; // after a failure: each later request would wait as long
    }
    return "";
}

// abort_message, its store request bounded by limit rather than the merge's timeout.
std::string abort_message_within(tm_dist_session *s, std::chrono::milliseconds limit) {
    if (!s->store) return "";
    const auto before = s->store->getTimeout();
    try {
        s->store->setTimeout(limit);
    } catch (const std::exception &) {
        return "";
    }
    std::string m = abort_message(s);
    try {
        s->store->setTimeout(before);
    } catch (const std::exception &) {
    }
    return m;
}

// The local address this host reaches addr from (no packet is sent: a UDP connect only picks
// the route), so Gloo listens where the other hosts can reach it. Many Debian hosts resolve
// their own name to 127.0.1.1, which is why Gloo's default device does not suffice.
std::string route_address(const std::string &addr, int port) {
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_DGRAM;
    if (getaddrinfo(addr.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || !res) return "";
    std::string out;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
        sockaddr_in local{};
        socklen_t len = sizeof local;
        char buf[INET_ADDRSTRLEN];
        if (getsockname(fd, reinterpret_cast<sockaddr *>(&local), &len) == 0 &&
            inet_ntop(AF_INET, &local.sin_addr, buf, sizeof buf))
            out = buf;
    }
    if (fd >= 0) close(fd);
    freeaddrinfo(res);
    return out;
}

// This rank's liveness store (any free port, on the address the others reach this host at),
// published as "live/RANK" = "host port" ("" when it cannot be served: no liveness then).
void serve_liveness(tm_dist_session *s) {
    std::string host = route_address(s->addr, s->cfg.master_port), where;
    try {
        if (!host.empty()) {
            c10d::TCPStoreOptions o;
            o.port = 0;
            o.isServer = true;
            o.waitWorkers = false;
            o.timeout = s->timeout;
            s->live = c10::make_intrusive<c10d::TCPStore>(host, o);
            s->live->set("alive", bytes("1"));
            where = host + " " + std::to_string(s->live->getPort());
        }
    } catch (const std::exception &) {
        s->live.reset();
    }
    s->store->set("live/" + std::to_string(s->cfg.rank), bytes(where));
}

// Clients of the other ranks' liveness stores (every rank published its own before the plan
// exchange), answering within 1 s or failing.
void connect_liveness(tm_dist_session *s) {
    s->peers.assign((size_t)s->cfg.world_size, c10::intrusive_ptr<c10d::TCPStore>());
    for (int r = 0; r < s->cfg.world_size; r++) {
        if (r == s->cfg.rank) continue;
        try {
            std::string where = text(s->store->get("live/" + std::to_string(r)));
            auto sp = where.find(' ');
            if (sp == std::string::npos) continue;
            c10d::TCPStoreOptions o;
            o.port = (uint16_t)std::stoi(where.substr(sp + 1));
            o.isServer = false;
            o.waitWorkers = false;
            o.timeout = std::min(s->timeout, std::chrono::milliseconds(1000));
            s->peers[(size_t)r] = c10::make_intrusive<c10d::TCPStore>(where.substr(0, sp), o);
            s->peers[(size_t)r]->get("alive");
        } catch (const std::exception &) {
            s->peers[(size_t)r].reset();
        }
    }
}

// The ranks that do not answer ("" if all do): those whose store does not answer within 1 s
// (stopped), else those whose connection is gone (dead, or left after failing themselves).
std::string stopped_ranks(tm_dist_session *s) {
    std::string stalled, gone;
    for (int r = 0; r < (int)s->peers.size(); r++) {
        if (!s->peers[(size_t)r]) continue;
        auto t0 = Clock::now();
        try {
            s->peers[(size_t)r]->get("alive"); // a get waits for its answer at most the timeout (an add would not)
        } catch (const std::exception &) {
            std::string &to = Clock::now() - t0 > std::chrono::milliseconds(500) ? stalled : gone;
            to += (to.empty() ? "" : ", ") + std::to_string(r);
        }
    }
    return stalled.empty() ? gone : stalled;
}

// Checks that exactly world_size ranks joined and that none gave up: a rank started with a larger
// WORLD_SIZE, or a second rank with the same RANK, would otherwise be left out of the average.
tm_status check_world(tm_dist_session *s, tm_error *err) {
    int64_t joined = s->store->add("joined", 0);
    std::string other = abort_message(s);
    if (!other.empty()) return tm_error_set(err, TM_ERROR_MISMATCH, "%s", other.c_str());
    if (joined != s->cfg.world_size)
        return tm_error_set(err, TM_ERROR_MISMATCH,
                            "%lld processes joined the rendezvous at %s:%d but WORLD_SIZE is %d: a rank was started "
                            "with another WORLD_SIZE or the same RANK twice; nothing written",
                            (long long)joined, s->addr.c_str(), s->cfg.master_port, s->cfg.world_size);
    return TM_OK;
}

}  // namespace

tm_status dist_open(const tm_dist_config *cfg, tm_dist_session **out, tm_error *err) {
    *out = nullptr;
    auto s = std::make_unique<tm_dist_session>();
    s->cfg = *cfg;
    s->addr = cfg->master_addr;
    s->ifname = cfg->ifname ? cfg->ifname : "";
    s->cfg.master_addr = s->addr.c_str();
    s->cfg.ifname = s->ifname.c_str();
    s->timeout = std::chrono::milliseconds((int64_t)(cfg->timeout_seconds * 1000.0));
    s->opened = Clock::now();
    try {
        c10d::TCPStoreOptions o;
        o.port = (uint16_t)cfg->master_port;
        o.isServer = cfg->rank == 0;
        o.waitWorkers = false;  // the exchanges below wait, bounded, and say who is missing
        o.timeout = s->timeout;
        s->store = c10::make_intrusive<c10d::TCPStore>(s->addr, o);
        s->store->setTimeout(s->timeout);
    } catch (const std::exception &e) {
        return tm_error_set(err, TM_ERROR_IO, "rank %d: cannot %s the rendezvous store at %s:%d within %g s: %s",
                            cfg->rank, cfg->rank == 0 ? "open" : "reach", s->addr.c_str(), cfg->master_port,
                            cfg->timeout_seconds, first_line(e).c_str());
    }
    try {
        s->store->add("joined", 1);
        serve_liveness(s.get());
    } catch (const std::exception &e) {
        return tm_error_set(err, TM_ERROR_IO, "rendezvous at %s:%d: %s", s->addr.c_str(), cfg->master_port,
                            first_line(e).c_str());
    }
    *out = s.release();
    return TM_OK;
}

tm_status dist_exchange(tm_dist_session *s, const char *topic, const char *mine, char ***all, tm_error *err) {
    *all = nullptr;
    if (tm_status st = drain_sends(s, 0, err)) return st;  // every block delivered before "done"
    const int w = s->cfg.world_size;
    std::vector<std::string> keys;
    for (int r = 0; r < w; r++) keys.push_back(std::string(topic) + "/" + std::to_string(r));
    try {
        s->store->set(keys[(size_t)s->cfg.rank], bytes(mine));
        // Polled rather than one blocking wait, so a rank that gave up ends the wait at once and the
        // message can name the ranks that never arrived.
        auto deadline = Clock::now() + s->timeout;
        while (!s->store->check(keys)) {
            std::string other = abort_message(s);
            if (!other.empty()) return tm_error_set(err, TM_ERROR_MISMATCH, "%s", other.c_str());
            if (Clock::now() > deadline) {
                std::string missing;
                for (int r = 0; r < w; r++)
                    if (!s->store->check({keys[(size_t)r]})) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
                return tm_error_set(err, TM_ERROR_IO,
                                    "rank %s did not reach the '%s' step of the rendezvous at %s:%d within %g s "
                                    "(not started, dead, or stalled)",
                                    missing.c_str(), topic, s->addr.c_str(), s->cfg.master_port, s->cfg.timeout_seconds);
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        char **out = static_cast<char **>(calloc((size_t)w, sizeof *out));
        if (!out) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        for (int r = 0; r < w; r++) out[r] = strdup(text(s->store->get(keys[(size_t)r])).c_str());
        *all = out;
        return TM_OK;
    } catch (const std::exception &e) {
        return tm_error_set(err, TM_ERROR_IO, "rendezvous at %s:%d ('%s' step): %s (rank 0, which holds the store, "
                            "died or stalled?)", s->addr.c_str(), s->cfg.master_port, topic, first_line(e).c_str());
    }
}

tm_status dist_start(tm_dist_session *s, tm_error *err) {
    try {
        auto opts = c10d::ProcessGroupGloo::Options::create(s->timeout);
        const char *env = getenv("GLOO_SOCKET_IFNAME");
        std::string ifname = !s->ifname.empty() ? s->ifname : env ? env : "";
        if (!ifname.empty()) {
            if (if_nametoindex(ifname.c_str()) == 0)  // Gloo's own message is an assertion's text
                return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                    "rank %d: %s '%s': no network interface of that name on this host",
                                    s->cfg.rank, !s->ifname.empty() ? "ifname" : "GLOO_SOCKET_IFNAME",
                                    ifname.c_str());
            opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
        } else {
            std::string local = route_address(s->addr, s->cfg.master_port);
            opts->devices.push_back(local.empty() ? c10d::ProcessGroupGloo::createDefaultDevice()
                                                  : c10d::ProcessGroupGloo::createDeviceForHostname(local));
        }
        opts->threads = 1;  // one exchange at a time: the engine issues them in plan order
        auto prefixed = c10::make_intrusive<c10d::PrefixStore>("gloo", s->store);
        s->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, s->cfg.rank, s->cfg.world_size, opts);
        connect_liveness(s);
        return TM_OK;
    } catch (const std::exception &e) {
        std::string other = abort_message(s);
        if (!other.empty()) return tm_error_set(err, TM_ERROR_IO, "%s", other.c_str());
        return tm_error_set(err, TM_ERROR_IO, "rank %d: cannot connect the Gloo process group within %g s: %s",
                            s->cfg.rank, s->cfg.timeout_seconds, first_line(e).c_str());
    }
}

namespace {

// Why an exchange with peer failed: which rank stopped (its liveness store does not answer), else
// what a rank that failed on purpose said, else the network. Every later exchange fails the same way.
tm_status exchange_failed(tm_dist_session *s, const char *what, int peer, const std::exception &e, tm_error *err) {
    std::string stopped = stopped_ranks(s), other;
    tm_status st;
    if (!stopped.empty()) {
        // A rank that gave up on purpose (a mismatch it saw) said why before it exited: that reason,
        // asked for briefly (rank 0's store may be held by a stalled rank).
        other = abort_message_within(s, std::chrono::milliseconds(1000));
        st = !other.empty() ? tm_error_set(err, TM_ERROR_IO, "%s", other.c_str())
                            : tm_error_set(err, TM_ERROR_IO,
                                           "rank %s stopped responding (died or stalled); %s rank %d failed after "
                                           "up to %g s: %s",
                                           stopped.c_str(), what, peer, s->cfg.timeout_seconds,
                                           first_line(e).c_str());
    } else if (!(other = abort_message(s)).empty()) {
        st = tm_error_set(err, TM_ERROR_IO, "%s", other.c_str());
    } else {
        st = tm_error_set(err, TM_ERROR_IO,
                          "%s rank %d failed: it died, stalled for more than the %g s timeout, or the network "
                          "failed (%s)",
                          what, peer, s->cfg.timeout_seconds, first_line(e).c_str());
    }
    s->broken = err->msg;
    return st;
}

// Runs one Gloo exchange, bounded by the timeout; a failure names the peer and what likely happened.
template <class F>
tm_status exchange_once(tm_dist_session *s, const char *what, int peer, double *data, size_t count, F start,
                        tm_error *err) {
    try {
        std::vector<at::Tensor> t;
        if (data) t.push_back(at::from_blob(data, {(int64_t)count}, at::TensorOptions().dtype(at::kDouble)));
        auto work = start(t);
        work->wait(s->timeout);
        return TM_OK;
    } catch (const std::exception &e) {
        return exchange_failed(s, what, peer, e, err);
    }
}


// The exchange, unless an earlier one broke the group.
template <class F>
tm_status exchange(tm_dist_session *s, const char *what, int peer, double *data, size_t count, F start,
                   tm_error *err) {
    if (!s->pg) return tm_error_set(err, TM_ERROR_INTERNAL, "distributed merge: no process group");
    // Once one exchange failed the group is broken: the blocks still in flight (rank 0 runs ahead)
    // would each wait out the timeout in turn (25 s seen with a 5 s timeout), so they fail at once.
    if (!s->broken.empty()) return tm_error_set(err, TM_ERROR_IO, "%s", s->broken.c_str());
    return exchange_once(s, what, peer, data, count, start, err);
}

}  // namespace

namespace {
constexpr size_t kSendsInFlight = 8;

// Waits for the oldest sends until at most keep are in flight.
tm_status drain_sends(tm_dist_session *s, size_t keep, tm_error *err) {
    while (s->sends.size() > keep) {
        auto p = s->sends.front();
        s->sends.pop_front();
        tm_status st = exchange(s, "sending block sums to", p.to, nullptr, 0,
                                [&](std::vector<at::Tensor> &) { return p.work; }, err);
        if (st) return st;
    }
    return TM_OK;
}
}  // namespace

tm_status dist_send(tm_dist_session *s, int to, const double *data, size_t count, tm_error *err) {
    if (!s->broken.empty()) return tm_error_set(err, TM_ERROR_IO, "%s", s->broken.c_str());
    tm_status st = drain_sends(s, kSendsInFlight - 1, err);
    if (st) return st;
    try {
        auto copy = at::empty({(int64_t)count}, at::TensorOptions().dtype(at::kDouble));
        memcpy(copy.data_ptr<double>(), data, count * sizeof *data);
        std::vector<at::Tensor> t{copy};
        s->sends.push_back({s->pg->send(t, to, 0), copy, to});
        return TM_OK;
    } catch (const std::exception &e) {  // the pair already closed: the peer died
        return exchange_failed(s, "sending block sums to", to, e, err);
    }
}

tm_status dist_recv(tm_dist_session *s, int from, double *data, size_t count, tm_error *err) {
    return exchange(s, "receiving block sums from", from, data, count,
                    [&](std::vector<at::Tensor> &t) { return s->pg->recv(t, from, 0); }, err);
}

tm_status dist_broadcast(tm_dist_session *s, int root, double *data, size_t count, tm_error *err) {
    return exchange(s, "the broadcast of the merged block from", root, data, count,
                    [&](std::vector<at::Tensor> &t) {
                        c10d::BroadcastOptions o;
                        o.rootRank = root;
                        o.timeout = s->timeout;
                        return s->pg->broadcast(t, o);
                    },
                    err);
}

tm_status dist_check_world(tm_dist_session *s, tm_error *err) {
    try {
        return check_world(s, err);
    } catch (const std::exception &e) {
        return tm_error_set(err, TM_ERROR_IO, "rendezvous store at %s:%d: %s", s->addr.c_str(), s->cfg.master_port,
                            first_line(e).c_str());
    }
}

void dist_abort(tm_dist_session *s, const char *message) {
    if (!s || !s->store) return;
    s->failed = true;
    try {
        if (!s->stuck && !s->store->check({"abort"})) s->store->set("abort", bytes(message));
    } catch (const std::exception &) {
        s->stuck = true;
    }
}

void dist_close(tm_dist_session *s) {
    if (!s) return;
    try {
        // Rank 0 holds the store: it stays (a few seconds at most) until the others have left it.
        if (s->stuck) throw std::runtime_error("the store does not answer");
        if (s->store && s->cfg.rank != 0) s->store->add("left", 1);
        // (After a failure, a short grace (1 s) after the last rank joined: the others poll the
        // store and learn of it at once; a stalled rank must not hold rank 0 much beyond the
        // timeout. A rank that has not joined yet (one failed early) may still join until the
        // rendezvous' own deadline, and learns of the failure then instead of finding no store.)
        auto grace = std::min(s->timeout, std::chrono::milliseconds(s->failed ? 1000 : 5000));
        auto until = Clock::now() + grace;
        for (int64_t seen = -1; s->store && s->cfg.rank == 0;) {
            int64_t joined = s->store->add("joined", 0), left = s->store->add("left", 0);
            if (joined != seen) until = std::max(until, Clock::now() + grace);
            seen = joined;
            bool leaving = left < joined - 1 && Clock::now() < until;
            bool joining = s->failed && joined < s->cfg.world_size && Clock::now() < s->opened + s->timeout;
            if (!leaving && !joining) break;
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
    } catch (const std::exception &) {
    }
    try {
        // After a failure the process group's destructor would drain its queue: every send still
        // in flight to a dead peer waiting out the timeout in turn (25 s seen with a 5 s timeout).
        // The process is about to exit: leave the group to the exit instead.
        // So are the stores: a store's destructor joins its daemon thread, which a stopped rank
        // may hold in the middle of a request.
        if (s->failed) {
            (void)s->pg.release();
            (void)s->live.release();
            (void)s->store.release();
        }
        s->pg.reset();
        s->peers.clear();
        s->live.reset();
        s->store.reset();
    } catch (const std::exception &) {
    }
    delete s;
}

}  // namespace torchmerge
