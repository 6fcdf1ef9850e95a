// qcow2::Image: open/close, header facts, and the public I/O calls, which
// check ranges and take the metadata lock before handing over to Impl.
#include <algorithm>
#include <cstring>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

namespace {
std::error_code zero_fill(uint64_t, std::span<std::byte> b) {
  std::memset(b.data(), 0, b.size());
  return {};
}
auto zero_fn = &zero_fill;

bool range_ok(uint64_t off, uint64_t len, uint64_t size) {
  return off <= size && len <= size - off;
}
}  // namespace

BelowReader zero_below() { return BelowReader(zero_fn); }

Image::Image(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Image::~Image() { (void)close(); }

std::error_code Image::close() {
  Impl& I = *impl_;
  if (I.ro || I.is_view) return {};
  std::unique_lock lk(I.mu);
  I.inflight_cv.wait(lk, [&] { return I.inflight.empty(); });
  if (I.closed) return {};
  I.closed = true;
  if (I.corrupt) return eio();
  if (auto ec = I.store_bitmaps()) return ec;
  if (auto ec = I.data_file->write_back_in_steps()) return ec;
  if (auto ec = I.flush_locked(true)) return ec;
  // Everything is on disk and synced: now the dirty bit may go (it is
  // written and synced on its own).
  if (I.dirty_bit && I.dirty_set_by_us) {
    if (auto ec = I.set_incompat_bit(fmt::kIncompatDirty, false)) return ec;
    I.dirty_bit = false;
    I.dirty_set_by_us = false;
  }
  return {};
}

// What a read-write open does beyond a read-only one, for Image::open and
// reopen_read_write: drop unknown autoclear bits, repair a dirty image,
// start recording the dirty bitmaps. mu is held exclusively (or the Image
// is not shared yet), the image is writable and not corrupt.
Status Image::Impl::finish_writable_open(RepairPlan* scanned) {
  if (h.version >= 3) {
    uint64_t keep = h.autoclear_features &
                    (fmt::kAutoclearDataFileRaw |
                     (bitmaps_valid ? fmt::kAutoclearBitmaps : 0));
    if (keep != h.autoclear_features) {
      if (auto ec = write_header_u64(fmt::kOffAutoclear, keep))
        return Status::IoError(ec, "clearing autoclear features");
      if (auto ec = file->flush()) return Status::IoError(ec, "flush");
      h.autoclear_features = keep;
    }
  }
  // Repair on open (see "Dirty bit" in image.h). A v3 image is dirty when
  // a writer was killed (or lost its machine) while it had the image open:
  // with our flush ordering that leaves leaks only, with lazy refcounts
  // (ours or QEMU's) refcounts may also be too low, and a kill in the
  // middle of taking or deleting a snapshot leaves COPIED flags that
  // disagree with the refcounts once the leaks are gone. Repair::All fixes
  // all of these; since raising a too-low refcount and correcting COPIED
  // flags to match the refcounts are always safe, it is used whoever set
  // the bit (QEMU repairs a dirty image it opens read-write the same way).
  // A v2 image cannot record dirtiness, so every read-write open scans it.
  if (repairs_on_writable_open()) {
    const bool v2 = h.version == 2;
    CheckReport rep;
    Status st = Status::Ok();
    if (scanned) {
      st = scanned->scanned;
      if (st.ok()) st = apply_repair(*scanned);
      rep = std::move(scanned->report);
    } else {
      st = check_locked(Repair::All, &rep);
    }
    // v2: the scan is a precaution; an image too large to scan opens as
    // it did before.
    if (!st.ok() && !(v2 && st.code() == std::errc::not_supported))
      return Status(st.code(), (v2 ? "scanning v2 image for leaks: "
                                   : "repairing dirty image: ") +
                                   st.message());
    if (!v2 && rep.check_errors)
      return Status(std::make_error_code(std::errc::io_error),
                    "could not repair dirty image: " +
                        std::to_string(rep.check_errors) + " check errors");
    // Left set (and not ours) if corruption remains that could not be
    // fixed, so that the next read-write open tries again.
    if (dirty_bit && dirty_set_by_us) {
      if (auto ec = set_incompat_bit(fmt::kIncompatDirty, false))
        return Status::IoError(ec, "clearing the dirty bit");
      dirty_bit = false;
      dirty_set_by_us = false;
    }
  }
  if (auto ec = start_recording_bitmaps())
    return Status::IoError(ec, "marking the dirty bitmaps in use");
  return Status::Ok();
}

Status Image::open(std::shared_ptr<File> file, const OpenOptions& options,
                   std::unique_ptr<Image>* out) {
  out->reset();
  if (!file) return Status::Invalid("no file");
  auto impl = std::make_unique<Impl>();
  Impl& I = *impl;
  I.file = file;
  I.opts = options;
  I.ro = options.read_only || !file->writable();
  if (Status st = I.parse_header(); !st.ok()) return st;
  // Per spec a corrupt image must not be written: writes fail with EIO
  // (begin_write), but check() may still repair it.
  if (I.h.has_data_file) {
    if (!options.data_file)
      return Status::Invalid("image needs its external data file '" +
                             I.h.data_file + "'");
    I.data_file = options.data_file;
    I.external = true;
  } else {
    I.data_file = file;
  }
  if (Status st = I.load_tables(); !st.ok()) return st;
  // Bitmaps QEMU would refuse (it then refuses the image) are left alone:
  // no read-write open (not even of a corrupt image, which a repairing
  // check could make writable), so no write can leave them stale.
  if (Status st = I.load_bitmaps(); !st.ok()) {
    if (!I.ro)
      return Status(st.code(), st.message() +
                                   " (QEMU refuses this image too; open it "
                                   "read-only to read it)");
    I.bitmaps_status = std::move(st);
  }
  if (!I.ro && !I.corrupt) {
    std::unique_lock lk(I.mu);
    if (Status st = I.finish_writable_open(); !st.ok()) return st;
  }
  out->reset(new Image(std::move(impl)));
  return Status::Ok();
}

// The repair scan of a dirty (or v2) image reads every table: it runs
// without mu, so that reads of the image (a commit's base, read by clients
// through the chain) go on meanwhile, cached or not. That is safe because
// nothing can change the metadata of a read-only image while reopen_mu
// keeps a write-back away, provided the caches hold nothing unflushed
// (else the scan runs under mu held exclusively, after a flush, as a
// read-write open's does). Only the repair it planned (a few refcounts and
// flags, nothing for a clean scan) waits for mu held exclusively.
Status Image::reopen_read_write() {
  Impl& I = *impl_;
  if (I.is_view) return Status::Invalid("a snapshot view cannot be made writable");
  std::lock_guard one(I.reopen_mu);
  bool scan_unlocked;
  {
    std::shared_lock lk(I.mu);
    if (!I.ro) return Status::Ok();
    scan_unlocked = I.repairs_on_writable_open() && !I.corrupt && !I.closed &&
                    !I.metadata_unflushed();
  }
  if (scan_unlocked) {
    std::lock_guard w(I.writeback_mu);
    scan_unlocked = !I.writeback_error;
  }
  std::optional<RepairPlan> plan;
  if (scan_unlocked) {
    plan.emplace();
    plan->scanned = I.scan_metadata(Repair::All, &*plan);
  }
  std::unique_lock lk(I.mu);
  if (!I.ro) return Status::Ok();
  if (I.closed) return Status::Invalid("image is closed");
  if (!I.file->writable() || (I.external && !I.data_file->writable()))
    return Status::Invalid(
        "reopen the file(s) read-write before the image (File::reopen)");
  if (I.corrupt)
    return Status::Invalid("image is corrupt: it stays read-only");
  if (!I.bitmaps_status.ok())
    return Status::Invalid("unusable persistent bitmaps (" +
                           I.bitmaps_status.message() +
                           "): the image stays read-only");
  // Writes that pass the early ro check now wait for mu; the steps below
  // need ro clear (they write), and run before any of those writes.
  I.ro = false;
  I.write_started = false;
  if (Status st = I.finish_writable_open(plan ? &*plan : nullptr); !st.ok()) {
    // Read-only again; what was done is crash-safe on its own (a dirty bit
    // left set is repaired by the next read-write open).
    I.ro = true;
    return st;
  }
  return Status::Ok();
}

bool Image::Impl::metadata_unflushed() const {
  if (l1_dirty || !pending_free.empty() || !reftable_pending.empty() || copied_flags_stale)
    return true;
  for (uint64_t i : l2_resident)
    if (l2[i]->dirty) return true;
  for (uint64_t i : rb_resident)
    if (refblocks[i]->dirty) return true;
  return false;
}

// close() without closing, arranged so that reads of the image are held up
// as little as possible (a live snapshot reopens the old top while clients
// read through it): writers are refused first, then the data is synced with
// no lock, then the metadata goes out under the shared lock.
Status Image::reopen_read_only() {
  Impl& I = *impl_;
  if (I.is_view) return Status::Ok();
  std::lock_guard reopening(I.reopen_mu);
  std::lock_guard one(I.writeback_mu);
  bool wrote_back = false;
  Status st = I.write_back_read_only(&wrote_back);
  if (!st.ok()) I.writeback_error = st.code();
  else if (wrote_back) I.writeback_error = {};
  return st;
}

Status Image::Impl::write_back_read_only(bool* wrote_back) {
  Impl& I = *this;
  {
    std::unique_lock lk(I.mu);
    I.inflight_cv.wait(lk, [&] { return I.inflight.empty(); });
    if (I.ro || I.closed) return Status::Ok();
    *wrote_back = true;
    // Whatever happens, nothing is written after this block (on an error
    // the dirty bit and in-use bitmaps may stay set, as after a failed
    // close()).
    struct MakeReadOnly {
      Impl& I;
      ~MakeReadOnly() { I.ro = true; }
    } make_read_only{I};
    if (I.corrupt) return Status::IoError(eio(), "image is corrupt");
    // Writing the bitmaps back allocates clusters: with the lock held
    // exclusively (images with recording bitmaps only).
    if (auto ec = I.store_bitmaps()) return Status::IoError(ec, "storing the dirty bitmaps");
    if (auto ec = I.refresh_copied_flags()) return Status::IoError(ec, "COPIED flags");
  }
  if (auto ec = I.data_file->write_back_in_steps()) return Status::IoError(ec, "writing back");
  if (auto ec = I.data_file->flush()) return Status::IoError(ec, "flush");
  std::shared_lock lk(I.mu);
  if (auto ec = I.write_back(true)) return Status::IoError(ec, "flush");
  if (I.dirty_bit && I.dirty_set_by_us) {
    if (auto ec = I.set_incompat_bit(fmt::kIncompatDirty, false))
      return Status::IoError(ec, "clearing the dirty bit");
    I.dirty_bit = false;
    I.dirty_set_by_us = false;
  }
  I.write_started = false;
  return Status::Ok();
}

Status Image::probe(std::shared_ptr<File> file, HeaderInfo* out) {
  if (!file) return Status::Invalid("no file");
  Impl I;
  I.file = std::move(file);
  I.ro = true;
  if (Status st = I.parse_header(); !st.ok()) return st;
  *out = I.h;
  return Status::Ok();
}

const HeaderInfo& Image::info() const { return impl_->h; }
uint64_t Image::size() const { return impl_->guest_size.load(std::memory_order_acquire); }
uint32_t Image::cluster_size() const { return impl_->h.cluster_size; }
uint32_t Image::subcluster_size() const {
  return static_cast<uint32_t>(impl_->sc_size);
}
bool Image::has_zero_clusters() const { return impl_->h.version >= 3; }
uint32_t Image::version() const { return impl_->h.version; }
const std::string& Image::backing_file() const { return impl_->h.backing_file; }
const std::string& Image::backing_format() const {
  return impl_->h.backing_format;
}
const std::string& Image::data_file_name() const { return impl_->h.data_file; }
bool Image::dirty() const { return impl_->dirty_bit; }
bool Image::corrupt() const { return impl_->corrupt; }
std::string Image::corrupt_reason() const {
  std::lock_guard lk(impl_->reason_mu);
  return impl_->corrupt_reason;
}
bool Image::read_only() const {
  return impl_->ro || impl_->is_view || impl_->corrupt;
}

std::string Image::feature_name(int type, int bit) const {
  for (auto& f : impl_->features)
    if (f.type == type && f.bit == bit) return f.name;
  return {};
}

std::vector<SnapshotInfo> Image::snapshots() const {
  std::shared_lock lk(impl_->mu);
  return impl_->snaps;
}

// Runs `step` under the shared metadata lock; when it stops at an L2 table
// that is not cached (setting *need_load and *load_index), loads that
// table under the exclusive lock and runs it again (a step resumes where
// it stopped).
template <typename Step>
std::error_code with_tables_loaded(Image::Impl& I, Step&& step) {
  for (;;) {
    bool need_load = false;
    uint64_t load_index = 0;
    {
      std::shared_lock lk(I.mu);
      if (auto ec = step(&need_load, &load_index)) return ec;
      if (!need_load) return {};
    }
    std::unique_lock lk(I.mu);
    L2Table* table;
    if (auto ec = I.load_l2(load_index, &table)) return ec;
  }
}

std::error_code Image::read(uint64_t offset, std::span<std::byte> buf,
                            BelowReader below) {
  Impl& I = *impl_;
  if (!range_ok(offset, buf.size(), I.guest_size.load(std::memory_order_acquire))) return einval();
  return with_tables_loaded(I, [&](bool* need_load, uint64_t* load_index) {
    return I.read_locked(offset, buf, below, need_load, load_index);
  });
}

std::error_code Image::read_nowait(uint64_t offset, std::span<std::byte> buf,
                                   BelowReader below) {
  Impl& I = *impl_;
  if (!range_ok(offset, buf.size(), I.guest_size.load(std::memory_order_acquire))) return einval();
  std::shared_lock lk(I.mu, std::try_to_lock);
  if (!lk.owns_lock())
    return std::make_error_code(std::errc::resource_unavailable_try_again);
  bool nl = false;
  uint64_t li = 0;
  return I.read_locked(offset, buf, below, &nl, &li, /*nowait=*/true);
}

std::error_code Image::write(uint64_t offset, std::span<const std::byte> data,
                             BelowReader below, bool fua) {
  Impl& I = *impl_;
  if (!range_ok(offset, data.size(), I.guest_size.load(std::memory_order_acquire))) return einval();
  if (I.corrupt) return eio();
  if (I.ro || I.is_view)
    return std::make_error_code(std::errc::operation_not_permitted);
  if (data.empty()) return {};
  std::error_code ec;
  bool done = false;
  {
    // The bitmaps are marked under the lock (shared is enough: bits are
    // set atomically), so that the set of recording bitmaps, which the
    // reopen calls change under the exclusive lock, holds still.
    std::shared_lock lk(I.mu);
    if (I.ro) return std::make_error_code(std::errc::operation_not_permitted);
    I.note_guest_change(offset, data.size());
    bool nl = false;
    uint64_t li;
    done = I.try_write_in_place(offset, data, &ec, &nl, &li);
  }
  if (!done) {
    // Allocating write: plan under the lock, write the data without it
    // (other requests proceed; overlapping metadata changes wait), then
    // map the new clusters under the lock again.
    uint64_t first = offset >> I.cb, last = (offset + data.size() - 1) >> I.cb;
    std::unique_lock<WriterPreferringMutex> lk;
    if ((ec = I.lock_for_change(lk, first, last))) return ec;
    I.note_guest_change(offset, data.size());  // again: a reopen may be between
    std::vector<ClusterPlan> plans;
    if ((ec = I.plan_write(offset, data, &plans))) {
      I.abort_plans(plans);
      return ec;
    }
    ec = I.execute_and_apply(lk, first, last, plans, below);
  }
  if (ec) return ec;
  return fua ? flush() : std::error_code{};
}

std::error_code Image::populate(uint64_t offset,
                               std::span<const std::byte> data) {
  Impl& I = *impl_;
  const uint64_t end = fmt::round_up(I.h.virtual_size, I.cs);
  if (offset % I.cs || data.size() % I.cs || offset > end ||
      data.size() > end - offset)
    return einval();
  if (data.empty()) return {};
  if (I.external) return std::make_error_code(std::errc::not_supported);
  if (I.corrupt) return eio();
  if (I.ro || I.is_view)
    return std::make_error_code(std::errc::operation_not_permitted);
  uint64_t first = offset >> I.cb, last = first + data.size() / I.cs - 1;
  std::unique_lock<WriterPreferringMutex> lk;
  if (auto ec = I.lock_for_change(lk, first, last)) return ec;
  std::vector<ClusterPlan> plans;
  if (auto ec = I.plan_populate(offset, data, &plans)) {
    I.abort_plans(plans);
    return ec;
  }
  if (plans.empty()) return {};
  BelowReader below = zero_below();  // every plan covers whole clusters
  return I.execute_and_apply(lk, first, last, plans, below);
}

std::error_code Image::write_zeroes(uint64_t offset, uint64_t length,
                                    bool may_unmap, BelowReader below,
                                    bool fua) {
  Impl& I = *impl_;
  if (!range_ok(offset, length, I.guest_size.load(std::memory_order_acquire))) return einval();
  if (length == 0) return {};
  {
    uint64_t first = offset >> I.cb, last = (offset + length - 1) >> I.cb;
    std::unique_lock<WriterPreferringMutex> lk;
    if (auto ec = I.lock_for_change(lk, first, last)) return ec;
    I.note_guest_change(offset, length);
    if (auto ec = I.zero_locked(offset, length, may_unmap, below)) return ec;
  }
  return fua ? flush() : std::error_code{};
}

std::error_code Image::discard(uint64_t offset, uint64_t length,
                               DiscardMode mode, BelowReader below) {
  if (mode == DiscardMode::Zero) return write_zeroes(offset, length, true, below);
  Impl& I = *impl_;
  if (!range_ok(offset, length, I.guest_size.load(std::memory_order_acquire))) return einval();
  if (length == 0) return {};
  uint64_t first = offset >> I.cb, last = (offset + length - 1) >> I.cb;
  std::unique_lock<WriterPreferringMutex> lk;
  if (auto ec = I.lock_for_change(lk, first, last)) return ec;
  I.note_guest_change(offset, length);
  return I.discard_locked(offset, length, below);
}

std::error_code Image::block_status(uint64_t offset, uint64_t length,
                                    MapExtent* out) {
  Impl& I = *impl_;
  if (length == 0 || !range_ok(offset, length, I.guest_size.load(std::memory_order_acquire)))
    return einval();
  return with_tables_loaded(I, [&](bool* need_load, uint64_t* load_index) {
    return I.status_locked(offset, length, out, need_load, load_index);
  });
}

std::error_code Image::begin_writes() {
  Impl& I = *impl_;
  std::unique_lock lk(I.mu);
  return I.begin_write();
}

// Image::flush keeps the metadata lock only while it writes, never across a
// sync, so reads and writes go on while the disk works:
//   1. sync the data of completed writes (no lock: the long part);
//   2. under the lock, write the dirty refcount blocks; without it, sync;
//   3. under the lock, write the L2 tables (whose clusters are now counted
//      on disk) and, after another unlocked sync, the L1 table; then the
//      refcount decrements that waited for the tables (pending frees);
//   4. the last sync, without the lock.
// Between the steps nobody may have changed the metadata: the lock's epoch
// tells. If someone did (an allocating write, a table load), the steps
// start again from 2 (what was written stays valid); after a few tries the
// rest is done the old way, all under the lock (flush_locked).
void Image::start_writeback() {
  Impl& I = *impl_;
  if (!I.ro && !I.is_view) I.data_file->start_writeback();
}

std::error_code Image::write_back_in_steps() {
  Impl& I = *impl_;
  if (I.ro || I.is_view) return {};
  return I.data_file->write_back_in_steps();
}

std::error_code Image::flush() {
  Impl& I = *impl_;
  if (I.is_view) return {};
  // A reopen_read_only() in progress writes back what this flush
  // promises: wait for it, and report how it went.
  auto written_back = [&] {
    std::lock_guard one(I.writeback_mu);
    return I.writeback_error;
  };
  if (I.ro) return written_back();
  if (I.corrupt) return eio();
  if (auto ec = I.data_file->flush()) return ec;
  std::unique_lock lk(I.mu);
  if (!I.corrupt && !I.ro) {
    if (auto ec = I.refresh_copied_flags()) return ec;
  }
  // Lets go of the lock for a sync; false if the metadata may have changed
  // meanwhile (or the sync failed: `*ec`).
  auto sync_unlocked = [&](std::error_code* ec) {
    const uint64_t epoch = I.mu.epoch();
    lk.unlock();
    *ec = I.file->flush();
    lk.lock();
    return !*ec && I.mu.epoch() == epoch + 1;
  };
  constexpr int kTries = 4;
  for (int attempt = 0; attempt < kTries; ++attempt) {
    if (I.corrupt) return eio();
    if (I.ro) {
      lk.unlock();  // writeback_mu goes before mu
      return written_back();
    }
    bool any_rb = !I.reftable_pending.empty(), any_l2 = false;
    for (uint64_t idx : I.rb_resident) any_rb |= I.refblocks[idx]->dirty;
    for (uint64_t idx : I.l2_resident) any_l2 |= I.l2[idx]->dirty;
    if (I.external && (any_l2 || I.l1_dirty)) break;  // the data file first: locked
    std::error_code ec;
    if (any_rb) {
      if ((ec = I.persist_refcounts())) return ec;
      if ((any_l2 || I.l1_dirty || !I.pending_free.empty()) && !sync_unlocked(&ec)) {
        if (ec) return ec;
        continue;
      }
    }
    if (any_l2) {
      if ((ec = I.write_l2s())) return ec;
      if ((I.l1_dirty || !I.pending_free.empty()) && !sync_unlocked(&ec)) {
        if (ec) return ec;
        continue;
      }
    }
    if ((ec = I.write_l1())) return ec;
    if (!I.pending_free.empty()) {
      // The tables that stopped using these clusters must be on disk first.
      if (!sync_unlocked(&ec)) {
        if (ec) return ec;
        continue;
      }
      if ((ec = I.apply_pending_frees())) return ec;
    }
    lk.unlock();
    return I.file->flush();
  }
  return I.corrupt ? eio() : I.flush_locked(true);
}

Status Image::open_snapshot(std::string_view id_or_name,
                            std::unique_ptr<Image>* out) const {
  out->reset();
  std::shared_lock lk(impl_->mu);
  const SnapshotInfo* s = nullptr;
  for (auto& sn : impl_->snaps)
    if (sn.id == id_or_name) s = &sn;
  if (!s)
    for (auto& sn : impl_->snaps)
      if (sn.name == id_or_name) s = &sn;
  if (!s)
    return {std::make_error_code(std::errc::no_such_file_or_directory),
            "no snapshot '" + std::string(id_or_name) + "'"};
  auto impl = std::make_unique<Impl>();
  Impl& I = *impl;
  I.file = impl_->file;
  I.data_file = impl_->data_file;
  I.external = impl_->external;
  I.opts = impl_->opts;
  I.ro = true;
  I.is_view = true;
  if (Status st = I.parse_header(); !st.ok()) return st;
  I.corrupt = false;
  I.h.l1_table_offset = s->l1_table_offset;
  I.h.l1_size = s->l1_size;
  I.set_size(s->virtual_size);
  uint64_t needed = fmt::div_round_up(fmt::div_round_up(s->virtual_size, I.cs),
                                      I.l2_size);
  if (s->l1_size < needed)
    return Status::Invalid("snapshot '" + s->name + "' L1 table too small for "
                           "its virtual size");
  if (Status st = I.load_tables(); !st.ok()) return st;
  out->reset(new Image(std::move(impl)));
  return Status::Ok();
}

Status Image::check(Repair repair, CheckReport* report) {
  Impl& I = *impl_;
  *report = CheckReport{};
  if (I.is_view) return Status::NotSupported("check on a snapshot view");
  std::unique_lock lk(I.mu);
  // Under mu: a reopen_read_write() changes ro under it exclusively.
  if (repair != Repair::None && I.ro)
    return {std::make_error_code(std::errc::operation_not_permitted),
            "repair needs a writable image"};
  I.inflight_cv.wait(lk, [&] { return I.inflight.empty(); });
  return I.check_locked(repair, report);
}

}  // namespace layerd::qcow2
