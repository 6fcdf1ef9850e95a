#include "overlay/image_locks.h"

#include <fmt/format.h>

namespace layerd {

LockSet qemu_locks(LockedFile file, Access access, bool force_share) {
  LockSet s;
  if (access == Access::Create)  // whatever the file is: no reader may stay
    return {perm::kWrite | perm::kResize, perm::kAll & ~perm::kResize};
  if (access != Access::Metadata) s.take = perm::kConsistentRead;
  if (access == Access::Write) {
    s.take |= perm::kWrite;
    // qcow2 grows its file as it allocates; a served raw image keeps its
    // size, and QEMU only takes what it may need.
    if (file == LockedFile::Qcow2Image || file == LockedFile::DataFile)
      s.take |= perm::kResize;
  }
  if (force_share) return s;
  switch (file) {
    case LockedFile::Qcow2Image:  // its metadata must not change underneath
      s.share = perm::kAll & ~(perm::kWrite | perm::kResize);
      break;
    case LockedFile::DataFile:
    case LockedFile::RawExport:
      s.share = perm::kAll & ~perm::kResize;
      break;
    case LockedFile::RawImage:
      break;
  }
  return s;
}

bool lock_image_file(File& file, const std::string& path, const LockSet& locks,
                     std::string* error) {
  LockConflict conflict;
  std::error_code ec = file.lock(locks, &conflict);
  if (!ec) return true;
  if (ec != std::errc::resource_unavailable_try_again) {
    *error = fmt::format("cannot lock '{}': {}", path, ec.message());
    return false;
  }
  std::string hint;
  if (locks.take & perm::kWrite) {
    if (conflict.permission != perm::kConsistentRead)
      hint = "; serve it read-only with -r -U to read it anyway";
  } else if (conflict.taken_by_other && locks.share != perm::kAll) {
    hint = "; pass -U/--force-share to read it anyway";
  }
  *error = fmt::format("'{}' is in use: {} (is QEMU or qemu-nbd using it?){}",
                       path, conflict.describe(), hint);
  return false;
}

}  // namespace layerd
