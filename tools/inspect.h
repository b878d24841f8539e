// The offline inspection commands of `kvtier`, on a store directory, read-only unless
// said otherwise, also while kvtierd or an embedded Store has it open (tools/store_reader.h):
//
//   kvtier info DIR      format version, layout and fingerprint, the disk tier's slab
//                        files and capacity, used and free bytes, free-extent
//                        fragmentation, counts of namespaces, sequences, blocks,
//                        quarantined blocks and representatives (inspect.cc)
//   kvtier ls DIR        one row per block (key, file, offset, length, checksum,
//                        generation, flags), streamed in key order (inspect.cc)
//   kvtier verify DIR    reads every block and checks it, checks the catalog against
//                        the slab files and the representatives against their blocks;
//                        --repair quarantines and drops what cannot be kept (verify.cc)
//   kvtier export DIR    a sequence's keys and values as .npy (export.cc)
//
// Every command takes --json (one JSON document on stdout, fields in a stable order)
// and exits with 0 = fine, 1 = a problem was found in the store (a damaged catalog,
// corrupt or misplaced blocks), 2 = a usage or I/O error (not a directory, not a store,
// a file that cannot be written). On an error, --json prints
// {"ok":false,"error":{"code":"...","message":"..."}} and the text form prints the
// message on stderr.
#ifndef KVTIER_TOOLS_INSPECT_H_
#define KVTIER_TOOLS_INSPECT_H_

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <string_view>

#include "kvtier/block_key.h"
#include "kvtier/status.h"

namespace kvtier::tools {

// Each registers its subcommand; when it runs, its exit status lands in *exit_code.
void AddInfoCommand(CLI::App& app, int* exit_code);
void AddLsCommand(CLI::App& app, int* exit_code);
// `kvtier stats --connect SOCKET`: a running kvtierd's counters (tools/stats.cc).
void AddStatsCommand(CLI::App& app, int* exit_code);
void AddVerifyCommand(CLI::App& app, int* exit_code);
void AddExportCommand(CLI::App& app, int* exit_code);

// Shared by the inspection commands.
// 1 for Corruption (the store is damaged), 2 for anything else.
int InspectExitCode(const Status& status);
// Prints the error (JSON on stdout with `json`, else text on stderr) and returns
// InspectExitCode(status).
int ReportInspectError(std::string_view command, const Status& status, bool json);
// A sequence id on the command line: a decimal number (SequenceId::FromU64) or 32 hex
// digits (SequenceId::ToHex's form).
Result<SequenceId> ParseSequenceArg(const std::string& text);
// 16 lowercase hex digits.
std::string Hex64(uint64_t value);

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_INSPECT_H_
