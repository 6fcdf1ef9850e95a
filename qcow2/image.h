// A qcow2 image: one file of a backing chain, answering only for itself.
//
// An Image maps guest offsets to what this file holds: data allocated here,
// zeros recorded here, or "not here: ask below". It never knows what lies
// below it. Reads and partial-cluster writes get the bytes they need from
// below through a BelowReader callback supplied by the caller (overlay/
// builds the chain; for an image with no backing it passes zero_below()).
//
// Metadata (L1, L2 tables, refcount blocks) lives in in-memory caches. L2
// tables and refcount blocks are written back lazily; flush() orders them:
// refcount blocks that count new clusters reach the disk (and are synced)
// before the L2 tables that point at those clusters, and L2 tables before
// the L1 entries that point at them. Refcount decrements of clusters that
// L2 tables stopped pointing at are applied only after those L2 tables are
// on disk, so a crash can leak clusters but never leave a live cluster with
// a zero refcount.
//
// Dirty bit (crash recovery): before the first metadata change of a
// read-write v3 Image (allocating write, zeroing, discard, snapshot,
// repairing check), the incompatible "dirty" bit is written and synced;
// close() syncs everything and then clears it. An image found dirty by a
// read-write open was not closed cleanly (kill -9, crash, or QEMU with
// lazy refcounts) and is repaired at open (check with Repair::All, which
// also fixes what lazy refcounts or a kill while taking a snapshot can
// leave), so leaks do not outlive the next read-write open. Opening an
// image read-write costs nothing until it is first changed; the first
// change and close() each add one header write and sync. A dirty image
// opened read-only is read as it is and left dirty (reading needs no
// refcounts). v2 has no dirty bit: every read-write open of a v2 image
// runs that check; it reads every L2 table and refcount block, and needs
// 4 bytes of memory per cluster of the file (64 MiB for a 1 TiB file of
// 64 KiB clusters): a cost accepted because v2 images are rare and
// usually small.
//
// Persistent dirty bitmaps (`qemu-img bitmap --add`) are kept as QEMU keeps
// them. While the autoclear "bitmaps" bit vouches for them, a read-write
// open loads every enabled, consistent bitmap, marks it in use on disk, and
// from then on every write, write_zeroes and discard sets the bits covering
// its guest range (before its data I/O); close() writes the bitmaps back to
// new clusters, points the header at a new directory, frees the old
// clusters and clears the in-use flags. Disabled bitmaps, and bitmaps found
// in use (their writer was killed: QEMU calls them inconsistent), are left
// on disk as they are. A kill before close() leaves the recording bitmaps
// in use, which QEMU reads as inconsistent; refcounts stay exact (bitmap
// clusters are counted by check, so the repair on open keeps them). A
// directory QEMU would refuse (bad flags, sizes, offsets, tables: QEMU then
// refuses the whole image) makes a read-write open fail, leaving the file
// untouched; a read-only open reads the image and reports it in
// bitmaps_status(). A read-only open changes nothing.
//
// Corrupt metadata found during I/O marks the image corrupt (the corrupt
// bit is written when the image is writable), fails the request with EIO
// and writes nothing else; later writes fail with EIO too.
//
// Thread safety: every public method may be called concurrently from many
// threads. Metadata sits behind a writer-preferring reader/writer lock:
// reads, block status and in-place overwrites of clusters this image owns
// share it (their pread/pwrite run under the shared lock, so a cluster
// cannot be freed and reused under them). An allocating write plans and
// allocates under the exclusive lock, then releases it for its data I/O
// (copy-on-write reads from below included) and retakes it to map the new
// clusters; other metadata changes to the same guest clusters wait for it.
// Zeroing, discard, check and snapshots take the lock exclusively; flush
// takes it only to write metadata, not for its syncs of data.
// A read of a cached L2 mapping allocates nothing. Dirty bitmaps need no
// lock on the data path: the set of bitmaps is fixed at open, bits are set
// with atomic ORs (no allocation) and dirty_status() reads them the same
// way; bitmaps() takes the metadata lock shared, and close() writes the
// bitmaps back under it exclusively. No other lock is taken with it held.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "qcow2/file.h"

namespace layerd::qcow2 {

// An error with a reason, for open/create/check. `code` is in the generic
// category: EINVAL for bad images ("L1 table offset 0x... beyond end of
// file"), ENOTSUP for features this implementation lacks, EIO for I/O.
class Status {
 public:
  Status() = default;
  Status(std::error_code code, std::string message)
      : code_(code), message_(std::move(message)) {}
  static Status Ok() { return {}; }
  static Status Invalid(std::string m) {
    return {std::make_error_code(std::errc::invalid_argument), std::move(m)};
  }
  static Status NotSupported(std::string m) {
    return {std::make_error_code(std::errc::not_supported), std::move(m)};
  }
  static Status IoError(std::error_code ec, std::string m) {
    return {ec, std::move(m) + ": " + ec.message()};
  }
  bool ok() const { return !code_; }
  explicit operator bool() const { return ok(); }
  const std::error_code& code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string to_string() const { return ok() ? "OK" : message_; }

 private:
  std::error_code code_;
  std::string message_;
};

// A non-owning reference to a callable
//   std::error_code(uint64_t offset, std::span<std::byte> buf)
// that fills `buf` with what lies below this image at guest `offset`
// (offset + size never exceeds the image's virtual size; the callable
// zero-fills what a shorter backing file lacks). It is only called during
// the Image call it was passed to, possibly from that call's thread with
// the Image's lock held, so it must not call back into the same Image.
// It allocates nothing. Pass a lambda directly in the call; do not keep a
// BelowReader made from a temporary.
class BelowReader {
 public:
  template <typename F,
            typename = std::enable_if_t<
                !std::is_same_v<std::remove_cvref_t<F>, BelowReader>>>
  BelowReader(F&& f)  // NOLINT: implicit by design
      : obj_(const_cast<void*>(static_cast<const void*>(&f))),
        call_([](void* o, uint64_t off, std::span<std::byte> b) {
          return (*static_cast<std::remove_reference_t<F>*>(o))(off, b);
        }) {}
  std::error_code operator()(uint64_t offset, std::span<std::byte> buf) const {
    return call_(obj_, offset, buf);
  }

 private:
  void* obj_;
  std::error_code (*call_)(void*, uint64_t, std::span<std::byte>);
};

// A BelowReader that fills with zeros (for images with no backing).
BelowReader zero_below();

struct OpenOptions {
  bool read_only = false;
  // Budget for cached L2 tables. The default maps the whole image for up
  // to 1 TiB of virtual size at 64 KiB clusters (128 MiB of tables);
  // memory is only used for tables actually loaded.
  uint64_t l2_cache_bytes = 128ull << 20;
  uint64_t refcount_cache_bytes = 4ull << 20;
  // Required when the image has the external data file bit. Opening it (by
  // the name in data_file_name()) is the caller's decision.
  std::shared_ptr<File> data_file;
  // On a read-write open of an image whose dirty bit is set, or of any v2
  // image (which has no dirty bit), check it and repair what is found
  // (Repair::All, see "Dirty bit" above); the bit is cleared unless
  // corruption remains that could not be repaired. Off: the image opens
  // as it is (e.g. to report its state, as `check` without -r does).
  bool repair_dirty_on_open = true;
};

struct SnapshotInfo {
  std::string id;
  std::string name;
  uint64_t vm_state_size = 0;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t virtual_size = 0;  // from extra data; the image size if absent
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
};

struct HeaderInfo {
  uint32_t version = 3;
  uint64_t virtual_size = 0;
  uint32_t cluster_bits = 16;
  uint32_t cluster_size = 65536;
  uint32_t refcount_bits = 16;
  bool extended_l2 = false;
  uint32_t compression_type = 0;  // 0 deflate, 1 zstd
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  std::string backing_file;    // empty if none
  std::string backing_format;  // empty if the extension is absent
  std::string data_file;       // name from the extension, may be empty
  bool has_data_file = false;  // incompatible bit 2
  bool data_file_raw = false;  // autoclear bit 1
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t header_length = 72;
};

// What block_status() reports for one extent of this image alone.
enum class ExtentKind {
  Data,         // allocated here: read from host_offset
  Zero,         // reads as zeros here (the layer below is hidden)
  Unallocated,  // not here: ask below
};

struct MapExtent {
  uint64_t length = 0;
  ExtentKind kind = ExtentKind::Unallocated;
  // Where the extent's host cluster lives in the image file (or the
  // external data file), contiguous across `length`: always for Data; for
  // Zero and (with subclusters) Unallocated extents inside a cluster that
  // has a host cluster, as QEMU's ZERO_ALLOC and UNALLOCATED_ALLOC.
  bool has_host_offset = false;
  uint64_t host_offset = 0;
  bool compressed = false;  // Data that is a compressed cluster
  bool in_data_file = false;
};

enum class DiscardMode {
  // Drop the mapping: the range reads from below afterwards.
  Unallocate,
  // Free the clusters but make the range read as zeros (zero flag in v3;
  // in v2, which has no zero flag, zeros are written).
  Zero,
};

enum class Preallocation { Off, Metadata };

struct CreateOptions {
  uint64_t size = 0;
  uint32_t version = 3;
  uint32_t cluster_size = 65536;
  uint32_t refcount_bits = 16;
  bool extended_l2 = false;
  std::string backing_file;
  std::string backing_format;
  std::string data_file;  // name recorded in the header (v3 only)
  bool data_file_raw = false;
  bool lazy_refcounts = false;
  uint32_t compression_type = 0;
  Preallocation preallocation = Preallocation::Off;
};

// A persistent dirty bitmap of the image.
struct BitmapInfo {
  std::string name;
  uint32_t granularity = 0;  // guest bytes per bit
  bool enabled = false;      // the "auto" flag: writes set its bits
  // Found in use at open (a writer was killed while it recorded): its bits
  // are unusable, as QEMU's "inconsistent" bitmaps. Kept on disk as it was.
  bool inconsistent = false;
  // This Image records writes in it (enabled and consistent, read-write):
  // in use on disk until close() writes it back.
  bool recording = false;
};

// What dirty_status() reports for one run of a bitmap.
struct DirtyExtent {
  uint64_t length = 0;
  bool dirty = false;
};

enum class Repair { None, Leaks, All };

struct CheckReport {
  uint64_t corruptions = 0;        // found (before repair)
  uint64_t leaks = 0;              // found (before repair)
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t check_errors = 0;       // could not check (I/O errors)
  uint64_t allocated_clusters = 0;
  uint64_t total_clusters = 0;     // guest clusters of the virtual disk
  uint64_t image_end_offset = 0;
  std::vector<std::string> messages;  // one line per problem found
  bool clean() const { return corruptions == 0 && leaks == 0 && check_errors == 0; }
};

class Image {
 public:
  // Opens `file` as qcow2. Validates the header, the extensions and the
  // table placements. Read-write unless options.read_only or the corrupt
  // bit is set (then the image opens read-only and writes return EIO).
  static Status open(std::shared_ptr<File> file, const OpenOptions& options,
                     std::unique_ptr<Image>* out);

  // Reads and validates only the header and its extensions (no tables):
  // e.g. to learn the external data file name or the backing file before
  // opening. Writes nothing.
  static Status probe(std::shared_ptr<File> file, HeaderInfo* out);

  // Writes a fresh image to `file` (which should be empty).
  static Status create(File& file, const CreateOptions& options);

  // Calls close() if it was not called (ignoring its error).
  ~Image();

  // Writes the recording dirty bitmaps back (see above), flushes and then,
  // if this Image set the dirty bit (or made a dirty image consistent with
  // a repairing check), clears it. Leaves it set, and the bitmaps in use,
  // when a write fails or the image was marked corrupt. Later calls
  // return {}; I/O after close() is not allowed.
  std::error_code close();
  Image(const Image&) = delete;
  Image& operator=(const Image&) = delete;

  // --- Reopening in place (live jobs) -------------------------------------
  // Makes a read-only Image (not a snapshot view) writable in place,
  // keeping its caches; reads on other threads go on meanwhile. The caller
  // reopens the File(s) read-write first (File::reopen): Invalid if
  // file()->writable() (or the data file's) is false. Does what a
  // read-write open does beyond a read-only one: clears unknown autoclear
  // bits, repairs a dirty image (when OpenOptions::repair_dirty_on_open)
  // and starts recording the persistent dirty bitmaps. Refuses, leaving
  // the image read-only, when it is corrupt or bitmaps_status() is not ok.
  // Ok without doing anything if it is writable already.
  Status reopen_read_write();
  // The reverse: what close() does (bitmaps written back, everything
  // flushed, the dirty bit cleared if ours), then the image is read-only
  // but stays open: reads go on, reopen_read_write() may follow. Waits for
  // in-flight allocating writes; the caller sees to it that no other write
  // is started meanwhile (those fail with EPERM once it returns). On an
  // error the image is read-only all the same, left as after a failed
  // close(), and its flush() reports the error until a later
  // reopen_read_only() of the writable image succeeds (one that finds it
  // read-only already changes nothing). Afterwards the caller may reopen
  // the File read-only.
  Status reopen_read_only();

  // Rewrites the backing file name and the backing format extension in
  // one crash-safe header write (synced), as QEMU's
  // qcow2_change_backing_file: every other extension is kept as it was.
  // An empty `format` drops the extension; an empty `name` leaves the image
  // without a backing file (then `format` must be empty too). Invalid when
  // the image is read-only, or "backing file name too long" when the
  // header would not fit in the first cluster (nothing is written then).
  // What lies below is the caller's business: the Image reads nothing of
  // it. backing_file(), backing_format() and info() report the new names
  // afterwards; do not call them concurrently with this.
  Status change_backing_file(const std::string& name, const std::string& format);

  // Grows the virtual disk to `new_size` (qemu-img resize, growing only):
  // the L1 table grows when needed (a new one in new clusters, then the
  // size and the table switch in one header write, then the old table is
  // freed), else only the size is rewritten. The new area is unallocated
  // here, so it reads from below, except the rest of a last cluster the
  // old size ended in, if allocated: its host bytes are zeroed first (a
  // disk shrunk by qemu-img resize --shrink may have left data there). QEMU (since 5.1) zeroes it instead when
  // the backing file is longer than the old size, so that no backing data
  // shows through; only the caller knows the sizes below, so it does that
  // itself (write_zeroes of [old size, new_size)) where it matters.
  // Invalid for shrinking, and for images with internal snapshots (QEMU
  // refuses them too) or persistent dirty bitmaps (their size is fixed in
  // the directory); NotSupported with an external data file. The caller
  // sees to it that no request is in flight (size() changes).
  Status grow(uint64_t new_size);
  // Grows like grow(), but the gained area reads as zeros whatever lies
  // below (QEMU's zero-filling resize over a longer backing file), and the
  // disk grows with its zeros in one crash-safe step: a kill at any moment
  // leaves the old disk or the grown one reading zeros past the old end,
  // never the backing file's data there (see resize.cc for the steps).
  // `below` is what the image reads through (for the last cluster, when the
  // old size ends inside one: it is rewritten allocated first). Needs zero
  // clusters: NotSupported on a v2 image. Refuses what grow() refuses; the
  // caller sees to it that no request is in flight.
  Status grow_reading_zeros(uint64_t new_size, BelowReader below);

  // Drops every cluster of the image (QEMU's bdrv_make_empty): afterwards
  // every guest offset reads from below, and the file shrinks to its
  // header and fresh, empty tables. Fast (a few small writes and syncs,
  // whatever the size) and crash-safe: a kill at any moment leaves the old
  // content or the empty image, never a mix, and a file that checks clean
  // (see resize.cc for the steps). The Image stays open and writable. The
  // caller sees to it that no request is in flight. Invalid for images
  // with internal snapshots or persistent dirty bitmaps (whose clusters
  // must be kept: remove the bitmaps first); NotSupported with an external
  // data file. On an I/O error the image is marked corrupt in memory (the
  // file is consistent, but which tables it uses is unknown): writes fail
  // with EIO, and the next read-write open repairs it.
  Status make_empty();

  // --- Header facts ------------------------------------------------------
  // Fixed at open, except the refcount table placement in info() (which
  // moves when the table grows), the backing file name and format
  // (change_backing_file), the virtual size and L1 placement (grow) and
  // the table placements (make_empty), and the dirty/corrupt state (use
  // dirty() and corrupt(), which are safe to call concurrently).
  const HeaderInfo& info() const;
  uint64_t size() const;
  uint32_t cluster_size() const;
  // The allocation unit: cluster_size()/32 with extended L2, else the
  // cluster size. write_zeroes and discard act without data I/O on whole
  // units (write_zeroes only on v3, which has zero clusters).
  uint32_t subcluster_size() const;
  bool has_zero_clusters() const;  // v3
  uint32_t version() const;
  const std::string& backing_file() const;
  const std::string& backing_format() const;
  const std::string& data_file_name() const;
  bool dirty() const;
  bool corrupt() const;
  // Why this Image marked itself corrupt (empty if it did not; an image
  // opened with the corrupt bit already set has no reason here).
  std::string corrupt_reason() const;
  bool read_only() const;
  // Names of the feature bits from the feature name table, if present.
  std::string feature_name(int type, int bit) const;

  // --- I/O (range must lie within size(): EINVAL otherwise) --------------

  // Reads `buf.size()` bytes at guest `offset`; ranges not allocated here
  // come from `below`. Contiguous host clusters are read with one pread.
  std::error_code read(uint64_t offset, std::span<std::byte> buf,
                       BelowReader below);

  // Like read(), but never waits: returns
  // errc::resource_unavailable_try_again (with `buf` partly filled) when it
  // would have to wait for the disk (an uncached L2 table, data not in the
  // page cache, a compressed cluster) or for the metadata lock. `below`
  // must not block either. Lets the server answer cached reads on its I/O
  // thread.
  std::error_code read_nowait(uint64_t offset, std::span<std::byte> buf,
                              BelowReader below);

  // Writes `data`, allocating clusters and copying the rest of partially
  // written clusters from `below` (or from the old zero/compressed/shared
  // cluster). With `fua` the write and its metadata are durable on return.
  std::error_code write(uint64_t offset, std::span<const std::byte> data,
                        BelowReader below, bool fua = false);

  // Writes whole clusters compressed, as QEMU's compress filter does
  // (BDRV_REQ_WRITE_COMPRESSED): `offset` is cluster-aligned and `data`
  // whole clusters, except that the last may end at the end of the disk
  // (the rest of that cluster compresses as zeros); EINVAL otherwise. Each
  // cluster is compressed with the image's compression type and its bytes
  // packed after the previous compressed cluster's in the file. A cluster
  // that does not compress to less than a cluster is written as an
  // ordinary one, as QEMU does. Unlike QEMU (which fails with EIO), a
  // cluster allocated already is replaced, and what it used is released
  // as by an ordinary write. ENOTSUP with an external data file. With
  // `fua` the data and its metadata are durable on return.
  std::error_code write_compressed(uint64_t offset,
                                   std::span<const std::byte> data,
                                   bool fua = false);

  // Copy-on-read and streaming: writes `data` into those clusters of
  // [offset, offset + data.size()) that are wholly unallocated here, and
  // leaves every other cluster alone, so that a write racing with it on
  // the same cluster always wins, whichever starts first. `offset` and
  // data.size() are multiples of the cluster size (the last cluster may
  // reach past the virtual size; its tail is ignored). Clusters whose data
  // is all zeros become zero clusters (v3) or are skipped (v2): they take
  // no space. ENOTSUP for images with an external data file.
  std::error_code populate(uint64_t offset, std::span<const std::byte> data);

  // Makes the range read as zeros. Whole clusters become zero clusters
  // (v3; with `may_unmap` their host clusters are freed, otherwise
  // preallocated ones are kept); partial clusters get written zeros.
  std::error_code write_zeroes(uint64_t offset, uint64_t length,
                               bool may_unmap, BelowReader below,
                               bool fua = false);

  // Frees the whole clusters (subclusters with extended L2) inside the
  // range; partial ones are left alone in Unallocate mode and zeroed in Zero
  // mode. Host clusters whose refcount drops to 0 are punched out of the
  // file after the metadata no longer points at them.
  std::error_code discard(uint64_t offset, uint64_t length, DiscardMode mode,
                          BelowReader below);

  // Describes the extent starting at `offset` (at most `length` bytes, at
  // least one byte). Needs no I/O when the L2 table is cached.
  std::error_code block_status(uint64_t offset, uint64_t length,
                               MapExtent* out);

  // Marks the image in use (the dirty bit, written and synced) now rather
  // than at its first metadata change, so that no client write waits for
  // that sync later (a live snapshot's new top, a commit's base). Needs a
  // writable image; a no-op when done already, and on v2.
  std::error_code begin_writes();

  // Starts the write-back of the data written so far without waiting for
  // it (File::start_writeback on the data file), so that a long copy into
  // the image (a commit's base) does not leave it all to the final flush.
  // A hint: durability still comes from flush(). Takes no lock.
  void start_writeback();

  // Writes the data written so far back to the disk and waits for it, a
  // step at a time (File::write_back_in_steps on the data file), so that a
  // flush() after it has little left and other requests to the disk never
  // queue behind the whole backlog. For block jobs' flushes while clients
  // are served (not while their requests wait); close() and
  // reopen_read_only() do it themselves. Durability still comes from
  // flush(); an error must be taken as a failed flush. Takes no lock.
  std::error_code write_back_in_steps();

  // Writes back dirty metadata in dependency order and syncs the file(s).
  // The syncs of data run without the metadata lock (reads and writes go on
  // meanwhile); the lock is held only while the metadata is written.
  std::error_code flush();

  // --- Persistent dirty bitmaps (see the top of this file) ----------------
  // In directory order. Empty when the image has none, or when
  // bitmaps_status() is not ok.
  std::vector<BitmapInfo> bitmaps() const;
  // Why the image's bitmap directory could not be used (only a read-only
  // open gets that far; the directory is then left alone); ok otherwise.
  Status bitmaps_status() const;
  // Describes the run of bitmap `name` starting at guest `offset`: dirty or
  // clean, at least one byte and at most `length` bytes. Errors:
  // no_such_file_or_directory (no such bitmap), state_not_recoverable
  // (inconsistent), invalid_argument (range outside the disk, length 0).
  // Never blocks and allocates nothing; a write that returned before the
  // call is visible in it.
  std::error_code dirty_status(std::string_view name, uint64_t offset,
                               uint64_t length, DirtyExtent* out) const;

  // --- Internal snapshots ------------------------------------------------
  std::vector<SnapshotInfo> snapshots() const;
  // A read-only Image over the same file, mapping with the snapshot's L1
  // table. Its size is the snapshot's virtual size. Below it, the caller
  // passes the same backing as for the active image.
  Status open_snapshot(std::string_view id_or_name,
                       std::unique_ptr<Image>* out) const;

  // Takes an internal snapshot of the current state, like `qemu-img
  // snapshot -c`: copies the L1 table, counts every cluster it reaches once
  // more, and adds an entry (next free numeric id, the given name, the
  // current time, no VM state). Needs a writable v2/v3 image without an
  // external data file and with refcount_bits >= 2; waits for in-flight
  // writes. Returns the new snapshot in `*created` if non-null.
  Status create_snapshot(const std::string& name, SnapshotInfo* created = nullptr);
  // Removes a snapshot (by id, else by name) and frees what only it used.
  // Views opened on that snapshot must be closed first (their clusters may
  // be reused afterwards).
  Status delete_snapshot(std::string_view id_or_name);

  // --- Consistency -------------------------------------------------------
  // Like `qemu-img check`: walks L1/L2 tables, snapshots and the other
  // metadata, rebuilds the expected refcounts and compares. Repair::Leaks
  // lowers refcounts that are too high; Repair::All also raises refcounts
  // that are too low and fixes the COPIED flags. Repair needs a writable
  // image, sets the dirty bit first (v3), and when no corruption remains
  // lets close() clear a dirty bit set by someone else.
  Status check(Repair repair, CheckReport* report);

  struct Impl;

 private:
  explicit Image(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace layerd::qcow2
