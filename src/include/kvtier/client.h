// The kvtierd sidecar client: what a Store opened with StoreOptions::sidecar (a Unix
// socket path or a TCP "host:port") is, beyond the Store interface.
//
// Such a Store sends every operation to the daemon over one connection, pipelined, and
// runs completions on its own threads. Block bytes move through a shared-memory staging
// area the daemon hands over with the handshake (Unix socket), or inline in the frames
// (TCP). When the connection breaks (the daemon restarted), every operation in flight
// fails with Unavailable, and so does every call made until a background thread has
// reconnected (exponential backoff from 10 ms to SidecarOptions::max_backoff_ms) and
// repeated the handshake; the store then works again without being reopened. Blocks
// the daemon kept (its disk tier) are still there; a memory-only daemon starts empty.
//
// What lives in an engine's GPU memory stays in the engine's process: Acquire and Release
// use a GPU tier of the client's own (StoreOptions::retrieval.device_capacity_bytes of
// the options given to Open, emulated in host memory without a GPU), fed from the
// daemon's tiers through the staging area; PutFromPagedCache gathers the blocks out of
// the engine's paged cache on the client's side, then Puts them through the daemon.
// Blocks this client overwrites, deletes or drops leave its GPU tier at once; a block
// another client rewrites under the same key may be served from it, with the bytes it
// had, until evicted. Direct copies between the daemon's host tier and the engine's GPU
// (CUDA IPC) are not built: each block crosses the staging area once.
//
// Thread safety: GetSidecarStatus may be called from any thread at any time.
#ifndef KVTIER_CLIENT_H_
#define KVTIER_CLIENT_H_

#include <cstdint>
#include <optional>
#include <string>

#include "kvtier/store.h"

namespace kvtier {

// A snapshot of a sidecar client's connection.
struct SidecarStatus {
  bool connected = false;   // a handshaken connection is up now
  uint64_t reconnects = 0;  // successful reconnections since Open (the first one is not)
  // Why the connection was last lost, or the last reconnection attempt failed; "" if never.
  std::string last_error;
  std::string daemon_version;  // of the daemon last connected to
  // Block bytes go through the shared-memory staging area (Unix socket) rather than
  // inline in the frames (TCP), and how many slots the daemon granted.
  bool shared_memory = false;
  uint32_t staging_blocks = 0;
  uint64_t requests_in_flight = 0;  // sent, reply not yet received
  // The client's GPU tier is registered with the daemon on this connection: its misses
  // are copied straight in (SidecarOptions::direct_device). When not, and it was tried,
  // why ("" otherwise).
  bool direct_device = false;
  std::string direct_device_error;
};

// The state of `store`'s connection to kvtierd; nullopt for an embedded store.
std::optional<SidecarStatus> GetSidecarStatus(const Store& store);

}  // namespace kvtier

#endif  // KVTIER_CLIENT_H_
