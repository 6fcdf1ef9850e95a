// The private side of qcow2::Image, and the table of contents of qcow2/:
//   format.h     on-disk constants, big-endian load/store
//   header.cc    open: header, extensions, snapshot table, validation;
//                small in-place header rewrites; the corrupt marker
//   map.cc       L2 cache, entry classification, read path, block status
//   write.cc     allocating writes (plan / execute / apply), in-place
//                overwrites, zero clusters, discard
//   refcount.cc  refcount blocks, the allocator, refcount table growth,
//                write-back order of metadata on flush
//   snapshot.cc  taking and deleting internal snapshots
//   bitmaps.cc   persistent dirty bitmaps: load, mark in use, record writes,
//                write back at close, count for check (codec in bitmaps.h)
//   check.cc     check and repair (refcount rebuild)
//   resize.cc    growing the disk (a larger L1 table), emptying the image
//   create.cc    laying out new images
//   compress.cc  deflate / zstd compression and decompression
//   write_compressed.cc  compressed cluster writes, their byte allocator
//   rwlock.h     the writer-preferring metadata lock
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "qcow2/bitmaps.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/rwlock.h"

namespace layerd::qcow2 {

inline std::error_code eio() { return std::make_error_code(std::errc::io_error); }
inline std::error_code einval() {
  return std::make_error_code(std::errc::invalid_argument);
}

std::string hex(uint64_t v);

// Decompresses one cluster. `type` is the header compression type.
bool decompress_cluster(uint32_t type, std::span<const std::byte> in,
                        std::span<std::byte> out);
// Compresses one cluster `in` into `out`; the compressed size, or nullopt
// when it does not fit in `out` (or the type is unknown).
std::optional<size_t> compress_cluster(uint32_t type,
                                       std::span<const std::byte> in,
                                       std::span<std::byte> out);

struct FeatureName {
  uint8_t type;
  uint8_t bit;
  std::string name;
};

// One cached L2 table, decoded to host byte order. With extended L2 every
// guest cluster has two words: the entry and the subcluster bitmap.
struct L2Table {
  uint64_t offset = 0;
  std::vector<uint64_t> words;
  bool dirty = false;
  std::atomic<uint64_t> last_use{0};
};

// One cached refcount block, kept in its on-disk form.
struct RefBlock {
  uint64_t offset = 0;
  std::vector<std::byte> raw;
  bool dirty = false;
  uint64_t last_use = 0;
};

// One guest cluster of an allocating write (see write.cc).
struct ClusterPlan {
  uint64_t gc = 0;            // guest cluster index
  uint64_t a = 0, b = 0;      // written bytes [a, b) within the cluster
  const std::byte* src = nullptr;  // the caller's bytes for [a, b)
  uint64_t e0 = 0, bm = 0;    // the L2 entry before the write
  uint64_t host_old = 0, host = 0;
  bool compressed = false, has_host = false;
  bool fresh = false;         // host is a new cluster (else written in place)
  uint32_t written = 0;       // units written (set by execute_write)
};

// What a guest cluster (or subcluster) is, from its L2 entry.
enum class CType { Unalloc, Zero, Data, Compressed };

// Decodes one snapshot table entry: the fixed part followed by its extra
// data, id and name, exactly as stored (lengths already validated).
// `default_size` is the image size, for entries without a size in their
// extra data.
SnapshotInfo decode_snapshot(const std::vector<std::byte>& raw,
                             uint64_t default_size);

// What a check found, and the repair it plans (check.cc).
struct RepairPlan {
  Status scanned = Status::Ok();  // what the scan returned
  Repair repair = Repair::None;
  CheckReport report;
  std::vector<uint32_t> expected;  // per host cluster: references found
  struct Refcount {
    uint64_t cluster, refcount;
    bool leak;  // else a corruption (a refcount too low)
  };
  std::vector<Refcount> refcounts;
  std::vector<std::pair<uint64_t, uint64_t>> l1_entries;  // (index, entry)
  struct L2Entry {
    uint64_t table, index, entry;  // l1 index, entry index, new first word
  };
  std::vector<L2Entry> l2_entries;
};

struct Image::Impl {
  // --- Set up at open -----------------------------------------------------
  std::shared_ptr<File> file;
  std::shared_ptr<File> data_file;  // == file unless external data file
  OpenOptions opts;
  HeaderInfo h;
  // h.virtual_size for the entry points' range checks and size(), which
  // read it without the metadata lock while a live grow changes it under
  // the lock (set_size keeps the two equal).
  std::atomic<uint64_t> guest_size{0};
  void set_size(uint64_t size) {
    h.virtual_size = size;
    guest_size.store(size, std::memory_order_release);
  }
  std::vector<FeatureName> features;
  std::vector<SnapshotInfo> snaps;
  std::vector<std::vector<std::byte>> snap_raw;  // entries as on disk, unpadded
  uint64_t snapshots_offset = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshot_table_bytes = 0;
  uint64_t bitmaps_dir_offset = 0, bitmaps_dir_size = 0;
  uint32_t nb_bitmaps = 0;
  bool has_bitmaps_ext = false;
  uint32_t bitmaps_ext_length = 0;
  uint32_t bitmaps_ext_reserved = 0;
  uint64_t bitmaps_ext_offset = 0;  // file offset of the extension's data
  bool is_view = false;  // snapshot view: read-only, foreign L1
  // Read-only (read-only open, or reopen_read_only): changed only by the
  // reopen calls, under mu held exclusively; read without it by the
  // public calls' early checks.
  std::atomic<bool> ro{false};
  bool external = false;  // external data file
  std::atomic<bool> corrupt{false};
  std::atomic<bool> dirty_bit{false};
  bool lazy = false;  // informational: refcounts are kept as without it

  uint32_t cb = 16;       // cluster bits
  uint64_t cs = 65536;    // cluster size
  uint32_t l2_bits = 13;  // log2(entries per L2 table)
  uint64_t l2_size = 8192;
  uint32_t words = 1;     // 64-bit words per L2 entry (2 with extended L2)
  uint64_t sc_size = 65536;  // subcluster size (== cs without extended L2)
  uint32_t units = 1;        // subclusters per cluster (32 or 1)
  uint32_t rb_order = 4;     // refcount order
  uint64_t rb_entries = 32768;  // refcounts per block
  uint64_t refcount_max = 65535;

  // --- Metadata (guarded by mu) --------------------------------------------
  mutable WriterPreferringMutex mu;
  std::vector<uint64_t> l1;
  bool l1_dirty = false;
  std::vector<std::unique_ptr<L2Table>> l2;  // indexed like l1
  std::vector<uint64_t> l2_resident;          // l1 indices with a table
  uint64_t l2_max_tables = 1;
  std::atomic<uint64_t> clock{1};

  std::vector<uint64_t> reftable;
  std::vector<std::unique_ptr<RefBlock>> refblocks;  // indexed like reftable
  std::vector<uint64_t> rb_resident;  // reftable indices with a block
  uint64_t rb_max_blocks = 1;
  std::vector<uint64_t> pending_free;  // host offsets to decrement after L2s
  // Reftable indices of refcount blocks created since the last
  // persist_refcounts(): set in `reftable`, not yet on disk.
  std::vector<uint64_t> reftable_pending;
  uint64_t free_hint = 0;              // cluster index
  uint64_t end_cluster = 0;            // clusters in use or allocated
  const std::vector<uint32_t>* reserved = nullptr;  // during repair
  bool write_started = false;  // begin_write ran (v3: the dirty bit is set)
  // The dirty bit on disk is ours to clear at close(): set by mark_dirty,
  // or found set and then made consistent by a repairing check.
  bool dirty_set_by_us = false;
  bool closed = false;
  std::mutex hdr_mu;  // serializes header field rewrites
  // Serializes reopen_read_write() and reopen_read_only(), so that the
  // metadata of a read-only image stays as it is while the first scans it
  // (a flush does not take it). Taken before writeback_mu.
  std::mutex reopen_mu;
  // Held by reopen_read_only() throughout (write_back() under a shared mu);
  // a flush of the image meanwhile waits for it. Taken before mu.
  std::mutex writeback_mu;
  // What the last reopen_read_only() write-back returned (guarded by
  // writeback_mu): flushes of the read-only image report it. A reopen
  // that finds the image read-only already leaves it as it is.
  std::error_code writeback_error;
  mutable std::mutex reason_mu;
  std::string corrupt_reason;

  // Fixed metadata (header, L1 table, refcount table, snapshot table and
  // snapshot L1 tables, bitmap directory) as sorted [begin, end) host
  // ranges: data writes are checked against them before they go out.
  std::vector<std::pair<uint64_t, uint64_t>> meta_ranges;
  void rebuild_meta_ranges();
  // Marks the image corrupt and returns EIO if [off, off+len) of the image
  // file overlaps fixed metadata.
  std::error_code check_data_write(uint64_t off, uint64_t len);

  // --- Persistent dirty bitmaps (bitmaps.cc) --------------------------------
  struct Bitmap {
    BitmapDirEntry entry;  // as on disk (close() rewrites table and flags)
    std::unique_ptr<DirtyBitmap> bits;  // null if inconsistent (in use)
    bool recording = false;             // writes set its bits
    std::vector<uint64_t> table;        // the table `entry` points at
  };
  // Fixed after open, except what close() writes back (under mu).
  std::vector<Bitmap> bitmaps;
  std::vector<DirtyBitmap*> recording;  // the hot path's view of `bitmaps`
  // The directory was validated: it and the tables are metadata.
  bool bitmaps_valid = false;
  Status bitmaps_status;  // why the directory is not used (read-only open)
  // The autoclear bit vouches for the bitmaps extension (v3): without it
  // the extension is stale and its clusters are leaks, as QEMU sees it.
  bool bitmaps_vouched() const;
  // Validates the directory and every bitmap table, and loads the bits of
  // the consistent bitmaps. Changes nothing on disk.
  Status load_bitmaps();
  // When the image becomes writable (read-write open, a repair that clears
  // the corrupt bit): marks the enabled, consistent bitmaps that are not
  // recording yet in use on disk and starts recording writes in them.
  std::error_code start_recording_bitmaps();
  // Sets the bits of [offset, offset + length) in every recording bitmap.
  void note_guest_change(uint64_t offset, uint64_t length) {
    for (DirtyBitmap* b : recording) b->mark(offset, length);
  }
  // close(): writes the recording bitmaps back and clears their in-use flag
  // (see bitmaps.cc for the order of writes).
  std::error_code store_bitmaps();
  // check: reports every cluster the bitmaps extension references to
  // `ref`, reading the directory from disk, problems to `corruption`, and
  // tables it could not read (whose clusters went uncounted) to
  // `read_error`.
  void count_bitmap_clusters(
      const std::function<void(uint64_t, uint64_t, const char*)>& ref,
      const std::function<void(std::string)>& corruption,
      const std::function<void()>& read_error);

  // --- image.cc ------------------------------------------------------------
  // The steps of a read-write open beyond a read-only one (autoclear bits,
  // dirty repair, bitmaps in use); mu held exclusively, ro clear.
  // `scanned`: the repair scan, made already (reopen_read_write scans
  // while reads go on); else it scans here.
  Status finish_writable_open(RepairPlan* scanned = nullptr);
  // Metadata changed in the caches and not written to the file (a failed
  // write-back leaves some); mu held.
  bool metadata_unflushed() const;
  // A read-write open repairs (or, v2, scans) the image first.
  bool repairs_on_writable_open() const {
    return opts.repair_dirty_on_open && (dirty_bit || h.version == 2);
  }

  // --- header.cc -----------------------------------------------------------
  Status parse_header();
  Status load_tables();
  std::error_code write_header_u64(size_t off, uint64_t v);
  // Rewrites the first cluster with a new backing file name and format
  // (empty: none) in one write; see Image::change_backing_file.
  Status rewrite_backing(const std::string& name, const std::string& format);
  std::error_code set_incompat_bit(uint64_t bit, bool on);
  // The dirty bit protocol (see image.h): sets the dirty bit, durably,
  // before this Image's first metadata change (called by begin_write and
  // by a repairing check). No-op on v2 and when the bit is already set;
  // otherwise the bit is ours (dirty_set_by_us) and close() clears it.
  std::error_code mark_dirty();
  std::error_code mark_corrupt(const std::string& why);

  // --- map.cc --------------------------------------------------------------
  // Returns the L2 table for l1 index `i`, or nullptr if none is mapped.
  // Requires mu held exclusively when the table is not loaded yet.
  std::error_code load_l2(uint64_t i, L2Table** out);
  std::error_code validate_l2_offset(uint64_t l1e, uint64_t i);
  void evict_l2_if_needed();
  CType classify(uint64_t e0, uint64_t bitmap, uint32_t unit,
                 uint64_t* host) const;
  std::error_code check_entry(uint64_t e0, uint64_t bitmap, uint64_t guest);
  // Looks up the unit (cluster or subcluster) holding guest `pos`: its type,
  // its host offset (for Data, at `pos`), the raw entry, and how many bytes
  // from `pos` to the end of the unit. `*need_load` when the L2 table is not
  // cached (then nothing else is set).
  std::error_code lookup(uint64_t pos, CType* type, uint64_t* host,
                         uint64_t* e0, uint64_t* avail, bool* need_load);
  // Reads what is mapped, stopping with `*need_load` at an uncached L2
  // table. With `nowait`, anything that would wait for the disk (data not
  // in the page cache, a compressed cluster, an uncached table) returns
  // errc::resource_unavailable_try_again instead.
  std::error_code read_locked(uint64_t& offset, std::span<std::byte>& buf,
                              BelowReader& below, bool* need_load,
                              uint64_t* load_index, bool nowait = false);
  std::error_code read_compressed(uint64_t e0, std::span<std::byte> out);
  void compressed_span(uint64_t e0, uint64_t* off, uint64_t* len) const;
  std::error_code fill_below(uint64_t guest, std::span<std::byte> buf,
                             BelowReader& below);
  std::error_code status_locked(uint64_t offset, uint64_t length,
                                MapExtent* out, bool* need_load,
                                uint64_t* load_index);

  // --- write.cc ------------------------------------------------------------
  std::error_code write_locked(uint64_t offset, std::span<const std::byte> data,
                               BelowReader& below);
  std::error_code plan_write(uint64_t offset, std::span<const std::byte> data,
                             std::vector<ClusterPlan>* plans);
  std::error_code execute_write(std::vector<ClusterPlan>& plans,
                                BelowReader& below);
  std::error_code apply_write(const std::vector<ClusterPlan>& plans);
  // After a failed plan or data write: gives back the fresh clusters of
  // `plans`, which nothing maps yet (a full disk must not leak what the
  // write that hit it took).
  void abort_plans(const std::vector<ClusterPlan>& plans);
  // Plans populate(): zero clusters are marked at once, the others get
  // fresh host clusters; clusters not wholly unallocated are skipped.
  std::error_code plan_populate(uint64_t offset, std::span<const std::byte> data,
                                std::vector<ClusterPlan>* plans);
  // Runs planned allocating writes of guest clusters [first, last): the
  // data I/O without the lock `lk` (overlapping changes wait), then maps
  // the clusters under it. `lk` is held on entry and released on return.
  std::error_code execute_and_apply(std::unique_lock<WriterPreferringMutex>& lk,
                                    uint64_t first, uint64_t last,
                                    std::vector<ClusterPlan>& plans,
                                    BelowReader& below);
  // Guest cluster ranges [first, last] whose allocating writes are between
  // plan and apply, with the lock released for their data I/O. Other
  // metadata changes to those clusters wait on `inflight_cv`.
  std::vector<std::pair<uint64_t, uint64_t>> inflight;
  std::condition_variable_any inflight_cv;
  bool inflight_overlaps(uint64_t first, uint64_t last) const;
  // Takes mu exclusively for a metadata change to guest clusters
  // [first, last]: runs begin_write(), then waits until no allocating
  // write overlapping them is between plan and apply.
  std::error_code lock_for_change(std::unique_lock<WriterPreferringMutex>& lk,
                                  uint64_t first, uint64_t last);
  // The bytes [a, b) of guest cluster `gc` (at guest offset guest0) that a
  // zero or discard request ending at `end` covers from `pos`. The tail of
  // the last cluster, beyond the disk, counts as covered.
  struct ClusterSpan {
    uint64_t gc, guest0, a, b;
  };
  ClusterSpan covered_span(uint64_t pos, uint64_t end) const;
  bool try_write_in_place(uint64_t offset, std::span<const std::byte> data,
                          std::error_code* ec, bool* need_load,
                          uint64_t* load_index);
  std::error_code write_cluster(uint64_t guest_cluster, uint64_t a,
                                std::span<const std::byte> data,
                                BelowReader& below);
  std::error_code l2_for_write(uint64_t i, L2Table** out);
  // Zeroes a newly allocated metadata cluster (write_zeroes allocates), so
  // that its space is taken on disk now: its write-back later is an
  // overwrite, and a full disk fails the request that needs the cluster,
  // not a flush of requests already acknowledged.
  std::error_code reserve_cluster(uint64_t host);
  std::error_code zero_locked(uint64_t offset, uint64_t length, bool may_unmap,
                              BelowReader& below);
  std::error_code discard_locked(uint64_t offset, uint64_t length,
                                 BelowReader& below);
  std::error_code release_entry(uint64_t e0, uint64_t bitmap);
  std::error_code reclaim_if_many();
  std::error_code begin_write();

  // --- write_compressed.cc -----------------------------------------------
  // Where the next compressed cluster's bytes may go: inside the host
  // cluster the last ones went into, 0 for a new host cluster. Reset when
  // that cluster is freed.
  uint64_t compressed_free = 0;
  std::error_code alloc_compressed_bytes(uint64_t len, uint64_t* host);
  // Maps guest cluster `gc` to `compressed` (one cluster's compressed
  // bytes), written to new bytes of the file; takes mu itself.
  std::error_code write_compressed_cluster(uint64_t gc,
                                           std::span<const std::byte> compressed);

  // --- refcount.cc ---------------------------------------------------------
  std::error_code load_refblock(uint64_t idx, RefBlock** out);
  std::error_code get_refcount(uint64_t cluster, uint64_t* rc);
  std::error_code set_refcount(uint64_t cluster, uint64_t rc);
  std::error_code alloc_clusters(uint64_t n, uint64_t* host);
  std::error_code grow_reftable(uint64_t need_index);
  std::error_code create_refblock(uint64_t idx, uint64_t cluster);
  std::error_code free_cluster_now(uint64_t host,
                                   std::vector<uint64_t>* punch = nullptr);
  std::error_code write_refblocks();
  // Writes dirty refcount blocks, then (after a flush, so the blocks are
  // durable first) the reftable entries of new ones. Callers flush before
  // writing L2 tables that may use the counted clusters.
  std::error_code persist_refcounts();
  std::error_code write_l2s();
  std::error_code write_l1();
  // Writes back dirty metadata in dependency order (and syncs with
  // `sync`); nothing for a read-only image. Needs mu exclusively.
  std::error_code flush_locked(bool sync);
  // The same for an image that was just made read-only (reopen_read_only):
  // with no writer left the metadata only changes when a table is loaded
  // or evicted, under mu held exclusively, so this runs under mu shared
  // (and writeback_mu), letting reads of cached tables go on.
  std::error_code write_back(bool sync);
  // Applies the refcount decrements that waited for the tables that
  // stopped using those clusters (which must be on disk), and punches the
  // freed clusters out of the file. Needs mu exclusively.
  std::error_code apply_pending_frees();
  // reopen_read_only()'s work, with writeback_mu held; `*wrote_back` is
  // set unless the image was read-only (or closed) already.
  Status write_back_read_only(bool* wrote_back);
  uint64_t rb_get(const RefBlock& b, uint64_t i) const;
  void rb_set(RefBlock& b, uint64_t i, uint64_t v) const;
  void evict_refblocks_if_needed();
  void note_end(uint64_t host_end);

  // --- snapshot.cc ---------------------------------------------------------
  std::error_code write_snapshot_table(
      std::vector<std::vector<std::byte>> entries);
  // Sets the COPIED flags of the active L1 and its tables to match the
  // refcounts (of tables whose own count is one, or of all of them).
  std::error_code set_copied_flags(bool shared_tables_too = false);
  // A snapshot taken or deleted only in part (an I/O error on the way)
  // leaves refcounts changed before the COPIED flags followed them (QEMU's
  // check calls that corruption, though data is safe: a flag too few only
  // copies a cluster that could be written in place, and a table whose
  // count is too high is shared with nothing). Then the flags are stale
  // until refresh_copied_flags() recomputes them, which every write-back
  // under mu held exclusively does first (flush, close, reopen read-only).
  bool copied_flags_stale = false;
  std::error_code refresh_copied_flags();
  Status create_snapshot_locked(const std::string& name);
  Status delete_snapshot_locked(const std::string& id_or_name);
  Status take_snapshot(const std::string& name);
  Status drop_snapshot(size_t index);

  // --- check.cc -----------------------------------------------------------
  // Flushes (when writable), scans and repairs; mu held exclusively.
  Status check_locked(Repair repair, CheckReport* report);
  // The scan alone: fills `plan` (report and planned fixes for `repair`).
  // Reads the file (not through the caches) and the tables in memory that
  // only writes change (L1, refcount table, snapshots): it may run without
  // mu, beside reads, provided nothing changes the metadata meanwhile (a
  // read-only image, reopen_mu held so that no write-back runs) and the
  // caches hold nothing unflushed (metadata_unflushed()); else with mu held
  // exclusively, after a flush.
  Status scan_metadata(Repair repair, RepairPlan* plan);
  // Applies what scan_metadata planned; mu held exclusively, the metadata
  // unchanged since the scan.
  Status apply_repair(RepairPlan& plan);
};

}  // namespace layerd::qcow2
