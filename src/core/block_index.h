// BlockIndex: the store's map from BlockKey to where the block lives, with the blocks
// of each sequence chained together so that DropSequence costs O(its blocks).
//
// Entries are stable in memory (node-based map) until erased: pointers to them stay
// valid across inserts and other erases.
//
// Thread safety: none; the Store calls it under its lock.
#ifndef KVTIER_CORE_BLOCK_INDEX_H_
#define KVTIER_CORE_BLOCK_INDEX_H_

#include <cstdint>
#include <unordered_map>
#include <utility>

#include "kvtier/block_key.h"
#include "storage/catalog.h"
#include "storage/host_pool.h"

namespace kvtier {

// A sequence within its namespace: the key of the per-sequence maps of src/core.
struct SequenceKey {
  uint32_t namespace_id;
  SequenceId sequence;
  friend bool operator==(const SequenceKey&, const SequenceKey&) = default;
};
struct SequenceKeyHash {
  size_t operator()(const SequenceKey& k) const noexcept {
    return SequenceIdHash{}(k.sequence) ^ (size_t{k.namespace_id} * 0x9E3779B97F4A7C15ull);
  }
};

class BlockIndex {
 public:
  static constexpr SlotId kNoSlot = UINT32_MAX;

  struct Entry {
    SlotId host_slot = kNoSlot;  // where the block is resident in the host tier
    bool dirty = false;          // the host copy is not durable yet
    bool on_disk = false;        // `disk` holds what the catalog durably references
    DiskLocation disk;
    uint64_t version = 0;  // the Put that made the host copy (store-wide counter)
    const BlockKey* key = nullptr;
    Entry* seq_prev = nullptr;  // the sequence's chain
    Entry* seq_next = nullptr;
  };

  BlockIndex() = default;
  BlockIndex(const BlockIndex&) = delete;
  BlockIndex& operator=(const BlockIndex&) = delete;

  // The entry of `key`, or nullptr.
  Entry* Find(const BlockKey& key);
  // The entry of `key`, created (with no location) when absent; second = created.
  std::pair<Entry*, bool> Insert(const BlockKey& key);
  // Removes `entry` (from Find or Insert); the pointer dies.
  void Erase(Entry* entry);
  // Calls on_erase(entry) for, then removes, every entry of the sequence; returns how
  // many there were.
  template <typename F>
  uint64_t EraseSequence(uint32_t namespace_id, const SequenceId& sequence, F&& on_erase);

  uint64_t size() const { return blocks_.size(); }
  uint64_t sequence_count() const { return sequences_.size(); }

 private:
  struct Chain {
    Entry* head = nullptr;
    uint64_t blocks = 0;
  };

  std::unordered_map<BlockKey, Entry, BlockKeyHash> blocks_;
  std::unordered_map<SequenceKey, Chain, SequenceKeyHash> sequences_;
};

template <typename F>
uint64_t BlockIndex::EraseSequence(uint32_t namespace_id, const SequenceId& sequence,
                                   F&& on_erase) {
  auto it = sequences_.find(SequenceKey{namespace_id, sequence});
  if (it == sequences_.end()) return 0;
  const uint64_t count = it->second.blocks;
  for (Entry* e = it->second.head; e != nullptr;) {
    Entry* next = e->seq_next;
    on_erase(*e);
    const BlockKey key = *e->key;  // a copy: the node holding *e->key goes away
    blocks_.erase(key);
    e = next;
  }
  sequences_.erase(it);
  return count;
}

}  // namespace kvtier

#endif  // KVTIER_CORE_BLOCK_INDEX_H_
