#include "src/server/protocol/codec.h"

#include <cstring>

namespace kvtier::wire {

flatbuffers::Offset<Outcome> ToWire(flatbuffers::FlatBufferBuilder& fbb, const Status& s) {
  auto message =
      s.ok() ? flatbuffers::Offset<flatbuffers::String>() : fbb.CreateString(s.message());
  return CreateOutcome(fbb, static_cast<int32_t>(s.code()), message);
}

Status FromWire(const Outcome* outcome) {
  if (outcome == nullptr || outcome->code() == 0) return Status::OK();
  const std::string_view message =
      outcome->message() != nullptr ? outcome->message()->string_view() : std::string_view();
  return Status(static_cast<StatusCode>(outcome->code()), message);
}

flatbuffers::Offset<Stats> ToWire(flatbuffers::FlatBufferBuilder& fbb, const StoreStats& s,
                                  uint64_t connected_clients, uint64_t namespace_blocks) {
  StatsBuilder b(fbb);
  b.add_block_bytes(s.block_bytes);
  b.add_host_capacity_bytes(s.host_capacity_bytes);
  b.add_host_slot_bytes(s.host_slot_bytes);
  b.add_host_slots(s.host_slots);
  b.add_host_blocks(s.host_blocks);
  b.add_host_pinned_slots(s.host_pinned_slots);
  b.add_host_memory(static_cast<uint8_t>(s.host_memory));
  b.add_puts(s.puts);
  b.add_gets(s.gets);
  b.add_get_misses(s.get_misses);
  b.add_deletes(s.deletes);
  b.add_dropped_sequences(s.dropped_sequences);
  b.add_dropped_blocks(s.dropped_blocks);
  b.add_evictions(s.evictions);
  b.add_evictions_lost(s.evictions_lost);
  b.add_busy_rejections(s.busy_rejections);
  b.add_bytes_put(s.bytes_put);
  b.add_bytes_got(s.bytes_got);
  b.add_put_waits(s.put_waits);
  b.add_disk_capacity_bytes(s.disk_capacity_bytes);
  b.add_disk_used_bytes(s.disk_used_bytes);
  b.add_disk_free_extents(s.disk_free_extents);
  b.add_disk_blocks(s.disk_blocks);
  b.add_dirty_blocks(s.dirty_blocks);
  b.add_corrupt_blocks(s.corrupt_blocks);
  b.add_disk_writes(s.disk_writes);
  b.add_disk_bytes_written(s.disk_bytes_written);
  b.add_disk_reads(s.disk_reads);
  b.add_disk_bytes_read(s.disk_bytes_read);
  b.add_disk_write_errors(s.disk_write_errors);
  b.add_disk_read_errors(s.disk_read_errors);
  b.add_catalog_commits(s.catalog_commits);
  b.add_indexed_blocks(s.indexed_blocks);
  b.add_index_memory_bytes(s.index_memory_bytes);
  b.add_selects(s.selects);
  b.add_select_nanos(s.select_nanos);
  b.add_device_capacity_bytes(s.device_capacity_bytes);
  b.add_device_slots(s.device_slots);
  b.add_device_blocks(s.device_blocks);
  b.add_device_emulated(s.device_emulated);
  b.add_acquires(s.acquires);
  b.add_acquired_blocks(s.acquired_blocks);
  b.add_device_hits(s.device_hits);
  b.add_device_fetches_host(s.device_fetches_host);
  b.add_device_fetches_disk(s.device_fetches_disk);
  b.add_device_bytes_in(s.device_bytes_in);
  b.add_device_evictions(s.device_evictions);
  b.add_prefetches(s.prefetches);
  b.add_prefetch_hits(s.prefetch_hits);
  b.add_acquire_stall_nanos(s.acquire_stall_nanos);
  b.add_connected_clients(connected_clients);
  b.add_namespace_blocks(namespace_blocks);
  return b.Finish();
}

StoreStats FromWire(const Stats& s) {
  StoreStats out;
  out.block_bytes = s.block_bytes();
  out.host_capacity_bytes = s.host_capacity_bytes();
  out.host_slot_bytes = s.host_slot_bytes();
  out.host_slots = s.host_slots();
  out.host_blocks = s.host_blocks();
  out.host_pinned_slots = s.host_pinned_slots();
  out.host_memory = static_cast<HostMemoryKind>(s.host_memory());
  out.puts = s.puts();
  out.gets = s.gets();
  out.get_misses = s.get_misses();
  out.deletes = s.deletes();
  out.dropped_sequences = s.dropped_sequences();
  out.dropped_blocks = s.dropped_blocks();
  out.evictions = s.evictions();
  out.evictions_lost = s.evictions_lost();
  out.busy_rejections = s.busy_rejections();
  out.bytes_put = s.bytes_put();
  out.bytes_got = s.bytes_got();
  out.put_waits = s.put_waits();
  out.disk_capacity_bytes = s.disk_capacity_bytes();
  out.disk_used_bytes = s.disk_used_bytes();
  out.disk_free_extents = s.disk_free_extents();
  out.disk_blocks = s.disk_blocks();
  out.dirty_blocks = s.dirty_blocks();
  out.corrupt_blocks = s.corrupt_blocks();
  out.disk_writes = s.disk_writes();
  out.disk_bytes_written = s.disk_bytes_written();
  out.disk_reads = s.disk_reads();
  out.disk_bytes_read = s.disk_bytes_read();
  out.disk_write_errors = s.disk_write_errors();
  out.disk_read_errors = s.disk_read_errors();
  out.catalog_commits = s.catalog_commits();
  out.indexed_blocks = s.indexed_blocks();
  out.index_memory_bytes = s.index_memory_bytes();
  out.selects = s.selects();
  out.select_nanos = s.select_nanos();
  out.device_capacity_bytes = s.device_capacity_bytes();
  out.device_slots = s.device_slots();
  out.device_blocks = s.device_blocks();
  out.device_emulated = s.device_emulated();
  out.acquires = s.acquires();
  out.acquired_blocks = s.acquired_blocks();
  out.device_hits = s.device_hits();
  out.device_fetches_host = s.device_fetches_host();
  out.device_fetches_disk = s.device_fetches_disk();
  out.device_bytes_in = s.device_bytes_in();
  out.device_evictions = s.device_evictions();
  out.prefetches = s.prefetches();
  out.prefetch_hits = s.prefetch_hits();
  out.acquire_stall_nanos = s.acquire_stall_nanos();
  return out;
}

std::vector<uint8_t> MakeFrame(flatbuffers::FlatBufferBuilder& fbb, Opcode opcode,
                               uint64_t request_id, bool reply) {
  const std::span<const uint8_t> body(fbb.GetBufferPointer(), fbb.GetSize());
  std::vector<uint8_t> frame(kHeaderBytes + body.size());
  FrameHeader h;
  h.opcode = static_cast<uint16_t>(opcode);
  h.flags = reply ? kFlagReply : 0u;
  h.body_bytes = static_cast<uint32_t>(body.size());
  h.request_id = request_id;
  EncodeHeader(h, std::span<uint8_t, kHeaderBytes>(frame.data(), kHeaderBytes));
  if (!body.empty()) std::memcpy(frame.data() + kHeaderBytes, body.data(), body.size());
  return frame;
}

}  // namespace kvtier::wire
