// Which locks an image file is opened with: the ones QEMU takes for the
// same use, so layerd and QEMU's programs refuse each other exactly what
// QEMU's programs refuse one another (the byte protocol is in
// qcow2/file.h). The table was read off qemu 7.2 (qemu-nbd, qemu-io and
// qemu-img, through /proc/locks and strace).
//
// Thread safety: plain functions of their arguments.
#pragma once

#include <string>

#include "qcow2/file.h"

namespace layerd {

// What an opened file is.
enum class LockedFile {
  Qcow2Image,  // a qcow2 image's own file
  DataFile,    // a qcow2 image's external data file
  RawExport,   // a raw image served directly (its size stays fixed)
  RawImage,    // any other raw image, e.g. a raw backing file
};

// How it is used.
enum class Access {
  Metadata,  // header and tables only, no guest data (qemu-img info)
  Read,
  Write,
  Create,  // (re)formatting the file from scratch (qemu-img create)
};

// QEMU's locks for `file` used as `access`. `force_share` (-U, for
// read-only uses) withholds nothing from other users.
LockSet qemu_locks(LockedFile file, Access access, bool force_share);

// Takes `locks` on `file`, named `path` in messages. On failure returns
// false and sets `error`, for a conflict to which permission another
// process holds or refuses and, where one helps, the option that gets
// past it (-U, or -r -U for a writable open).
bool lock_image_file(File& file, const std::string& path, const LockSet& locks,
                     std::string* error);

}  // namespace layerd
