#include "server/connection.h"

#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "overlay/client_activity.h"
#include "qcow2/file.h"
#include "qcow2/image.h"
#include "server/log.h"

namespace layerd {

namespace asio = boost::asio;
using asio::use_awaitable;

namespace {

constexpr size_t kReadBufferSize = 64 * 1024;
constexpr size_t kAlignment = 4096;
// Payload buffers up to this size are kept for reuse; larger ones are rare
// and freed after use.
constexpr size_t kMaxPooledBuffer = 1 << 20;
constexpr size_t kMaxPooledBuffers = 32;
// Block status: extents gathered per request (more are left for the client
// to ask for again, as the spec allows).
constexpr size_t kMaxExtents = 1024;
// A structured READ over a layer with cheap block status is answered in at
// most this many chunks: zero ranges as OFFSET_HOLE (no data on the wire),
// the rest as OFFSET_DATA; whatever lies past the last one is sent as data.
constexpr size_t kMaxReadChunks = 64;
// READs up to this size may be answered on the loop thread when their data
// is cached; larger copies are better spread over the workers.
constexpr uint32_t kMaxInlineRead = 64 * 1024;
// Likewise for WRITE, WRITE_ZEROES and TRIM served on the loop thread:
// while a large write is copied, a worker-served stream would already be
// reading the next payload.
constexpr uint32_t kMaxInlineWrite = 64 * 1024;
// Replies to requests served on the loop thread are held back until the
// reader runs out of buffered requests, or this many are waiting.
constexpr size_t kMaxHeldReplies = 32;
constexpr size_t kMaxHeldBytes = 256 * 1024;

size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

iovec iov_of(const void* p, size_t n) { return {const_cast<void*>(p), n}; }

// Whether `data` holds an aligned block of zeros, the smallest zero range
// a qcow2 image can record (512-byte clusters). Real data almost always
// fails the first word of each block, so this costs little.
bool has_zero_block(std::span<const std::byte> data) {
  constexpr size_t kBlock = 512;
  for (size_t at = 0; at + kBlock <= data.size(); at += kBlock)
    if (all_zero(data.subspan(at, kBlock))) return true;
  return false;
}

bool offers(const Export& e, const MetaContext& c) {
  return c.name != kAllocationDepthContext || e.policy.allocation_depth;
}

}  // namespace

// An aligned, reusable block of memory for request payloads and read data.
class Connection::Buffer {
 public:
  explicit Buffer(size_t capacity)
      : capacity_(round_up(std::max<size_t>(capacity, kAlignment), kAlignment)),
        data_(static_cast<std::byte*>(std::aligned_alloc(kAlignment, capacity_))) {
    if (!data_) throw std::bad_alloc();
  }
  ~Buffer() { std::free(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  size_t capacity() const { return capacity_; }
  std::span<std::byte> span(size_t n) { return {data_, n}; }

 private:
  size_t capacity_;
  std::byte* data_;
};

// WRITE payload buffers: acquired by the reader, released by workers.
class Connection::BufferPool {
 public:
  Buffer* acquire(size_t n) {
    {
      std::lock_guard lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if ((*it)->capacity() >= n) {
          Buffer* b = it->release();
          free_.erase(it);
          return b;
        }
      }
    }
    return new Buffer(n <= 64 * 1024 ? 64 * 1024 : n);
  }

  void release(Buffer* b) {
    std::unique_ptr<Buffer> owned(b);
    if (b->capacity() > kMaxPooledBuffer) return;
    std::lock_guard lock(mutex_);
    if (free_.size() < kMaxPooledBuffers) free_.push_back(std::move(owned));
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<Buffer>> free_;
};

// Buffered reads from the socket: one recv usually brings several
// pipelined request headers. Large payloads are read straight into their
// destination. Before it waits for the socket, held replies go out.
class Connection::ReadBuffer {
 public:
  ReadBuffer(Socket& socket, Connection& connection)
      : socket_(socket), connection_(connection), buf_(kReadBufferSize) {}

  // (The TLS branches are spelt out at each read so that the plain path
  // awaits the socket directly, with no coroutine of its own.)
  asio::awaitable<void> read_exact(std::span<std::byte> out) {
    size_t got = take(out);
    while (got < out.size()) {
      auto rest = out.subspan(got);
      connection_.flush_held_replies();
      if (rest.size() >= buf_.size() / 2) {
        if (connection_.tls_)
          got += co_await connection_.tls_read_some(rest);
        else
          got += co_await socket_.async_read_some(
              asio::buffer(rest.data(), rest.size()), use_awaitable);
      } else {
        begin_ = 0;
        if (connection_.tls_)
          end_ = co_await connection_.tls_read_some(buf_);
        else
          end_ = co_await socket_.async_read_some(asio::buffer(buf_), use_awaitable);
        got += take(rest);
      }
    }
  }

  asio::awaitable<void> skip(uint64_t n) {
    while (n > 0) {
      if (begin_ == end_) {
        connection_.flush_held_replies();
        begin_ = 0;
        if (connection_.tls_)
          end_ = co_await connection_.tls_read_some(buf_);
        else
          end_ = co_await socket_.async_read_some(asio::buffer(buf_), use_awaitable);
      }
      size_t k = static_cast<size_t>(std::min<uint64_t>(n, end_ - begin_));
      begin_ += k;
      n -= k;
    }
  }

 private:
  size_t take(std::span<std::byte> out) {
    size_t k = std::min(out.size(), end_ - begin_);
    std::memcpy(out.data(), buf_.data() + begin_, k);
    begin_ += k;
    return k;
  }

  Socket& socket_;
  Connection& connection_;
  std::vector<std::byte> buf_;
  size_t begin_ = 0;
  size_t end_ = 0;
};

namespace {

// Per worker thread scratch memory for READ data, reused across requests.
std::span<std::byte> read_scratch(size_t n) {
  thread_local std::unique_ptr<std::byte, decltype(&std::free)> kept(nullptr,
                                                                     &std::free);
  thread_local size_t kept_size = 0;
  thread_local std::unique_ptr<std::byte, decltype(&std::free)> oversized(
      nullptr, &std::free);
  if (n <= kept_size) return {kept.get(), n};
  size_t size = round_up(std::max<size_t>(n, 64 * 1024), kAlignment);
  auto* p = static_cast<std::byte*>(std::aligned_alloc(kAlignment, size));
  if (!p) throw std::bad_alloc();
  if (size <= 4 * kMaxPooledBuffer) {
    kept.reset(p);
    kept_size = size;
  } else {
    oversized.reset(p);  // freed on the next oversized read
  }
  return {p, n};
}

}  // namespace

Connection::Connection(Socket socket, const ExportRegistry& exports,
                       WorkerPool& workers, LoopThreads& loop,
                       ClientSlots& slots, ConnectionLimits limits,
                       std::string peer, const TlsCredentials* tls)
    : socket_(std::move(socket)),
      fd_(socket_.native_handle()),
      exports_(exports),
      workers_(workers),
      loop_(loop),
      slots_(slots),
      limits_(limits),
      peer_(std::move(peer)),
      tls_credentials_(tls),
      buffers_(std::make_unique<BufferPool>()),
      sender_(fd_, peer_),
      wake_(socket_.get_executor()),
      idle_timer_(socket_.get_executor()) {}

Connection::~Connection() = default;

std::optional<nbd::ExportInfo> Connection::find_export(std::string_view name) {
  std::string session;
  auto e = exports_.resolve(name, &session);
  if (!e) return std::nullopt;
  negotiated_ = {std::string(name), e, session};
  return e->info(session);
}

std::vector<nbd::ExportInfo> Connection::list_exports() {
  std::vector<nbd::ExportInfo> v;
  for (auto& e : exports_.all()) v.push_back(e->info());
  return v;
}

std::vector<std::string> Connection::meta_contexts(const nbd::ExportInfo& info) {
  std::vector<std::string> v;
  if (!negotiated_.e || negotiated_.e->info(negotiated_.session).name != info.name)
    return v;
  for (const auto& c : layerd::meta_contexts())
    if (offers(*negotiated_.e, c)) v.emplace_back(c.name);
  for (const auto& b : negotiated_.e->bitmaps) v.push_back(b.context);
  return v;
}

void Connection::stop() {
  if (stopping_) return;
  stopping_ = true;
  // Ends the reader's next read with EOF; replies can still be sent.
  ::shutdown(fd_, SHUT_RD);
  wake_.cancel();
  idle_timer_.cancel();
}

void Connection::drop(const char* why) {
  log_info("{}: {}, dropped", peer_, why);
  stopping_ = true;
  ::shutdown(fd_, SHUT_RDWR);
  wake_.cancel();
  idle_timer_.cancel();
}

void Connection::start_negotiating() {
  std::weak_ptr<Connection> weak = weak_from_this();
  slot_id_ = slots_.start_negotiating([weak, executor = executor()] {
    asio::post(executor, [weak] {
      if (auto c = weak.lock())
        c->drop("too many connections negotiating (--max-handshakes), oldest");
    });
  });
}

asio::awaitable<bool> Connection::wait_for_serving_slot() {
  std::weak_ptr<Connection> weak = weak_from_this();
  slot_granted_ = slots_.request_slot(slot_id_, [weak, executor = executor()] {
    asio::post(executor, [weak] {
      if (auto c = weak.lock()) {
        c->slot_granted_ = true;
        c->wake_.cancel();
      }
    });
  });
  if (!slot_granted_) log_info("{}: waiting for a client slot (-e)", peer_);
  while (!slot_granted_ && !stopping_) {
    wake_.expires_at(asio::steady_timer::time_point::max());
    co_await wake_.async_wait(asio::as_tuple(use_awaitable));
  }
  co_return slot_granted_ && !stopping_;
}

void Connection::arm_idle_timer() {
  const auto limit = std::chrono::seconds(limits_.idle_timeout_seconds);
  const bool busy = in_flight_.load() != 0;
  idle_timer_.expires_at((busy ? std::chrono::steady_clock::now() : last_request_) + limit);
  idle_timer_.async_wait([self = shared_from_this(), limit](boost::system::error_code ec) {
    if (ec || self->stopping_) return;
    if (self->in_flight_.load() == 0 &&
        std::chrono::steady_clock::now() - self->last_request_ >= limit) {
      log_info("{}: idle for {} s (--idle-timeout), disconnecting", self->peer_,
               limit.count());
      self->stop();
      return;
    }
    self->arm_idle_timer();
  });
}

asio::awaitable<void> Connection::run() {
  auto self = shared_from_this();
  start_negotiating();
  try {
    if (co_await handshake()) co_await transmission();
  } catch (const boost::system::system_error& e) {
    auto ec = e.code();
    if (ec != asio::error::eof && ec != asio::error::connection_reset &&
        ec != asio::error::operation_aborted && ec != asio::error::broken_pipe)
      log_info("{}: connection error: {}", peer_, e.what());
  } catch (const std::exception& e) {
    log_error("{}: connection failed: {}", peer_, e.what());
  }
  flush_held_replies();
  co_await wait_until_idle();
  if (layer_ && wrote_.load()) {
    auto section = loop_.enter_blocking();
    if (auto ec = layer_->flush())
      log_error("{}: flush at disconnect failed: {}", peer_, ec.message());
  }
  {
    // Dropping the last user of a per-client overlay, or of an export a
    // reload replaced, closes (or keeps) images: file I/O.
    auto section = loop_.enter_blocking();
    layer_.reset();
    session_.reset();
    export_.reset();
  }
  sender_.end_tls();
  boost::system::error_code ignored;
  idle_timer_.cancel();
  socket_.shutdown(Socket::shutdown_both, ignored);
  socket_.close(ignored);
  slots_.leave(slot_id_);
  log_info("{}: disconnected", peer_);
}

// Runs the handshake to its end. Returns normally even when the client
// goes away (the phase then is not Transmission): operator|| in handshake()
// waits for the first branch to *succeed*, so an exception here would let
// the time limit, not the disconnect, end the race.
asio::awaitable<void> Connection::handshake_steps(
    nbd::Handshake& hs, std::vector<std::byte>& final_output) {
  using Phase = nbd::Handshake::Phase;
  try {
    std::vector<std::byte> in;
    auto out = hs.take_output();
    co_await handshake_write(out);
    for (;;) {
      if (hs.phase() == Phase::StartTls) {
        // The plain-text acknowledgement went out above; nothing the
        // client negotiated before it counts any more.
        negotiated_ = {};
        if (!co_await start_tls()) co_return;
        hs.tls_started();
      }
      if (hs.phase() != Phase::Greeting && hs.phase() != Phase::Options) break;
      in.resize(hs.bytes_wanted());
      co_await handshake_read(in);
      hs.consume(in);
      out = hs.take_output();
      if (hs.phase() == Phase::Transmission) {
        final_output = std::move(out);
        break;
      }
      if (!out.empty()) co_await handshake_write(out);
    }
  } catch (const boost::system::system_error& e) {
    log_info("{}: left during the handshake: {}", peer_, e.code().message());
  }
}

asio::awaitable<bool> Connection::handshake() {
  using namespace asio::experimental::awaitable_operators;
  const nbd::TlsMode tls_mode =
      !tls_credentials_ ? nbd::TlsMode::None
      : tls_credentials_->mode() == TlsMode::Require ? nbd::TlsMode::Required
                                                     : nbd::TlsMode::Offered;
  nbd::Handshake hs(*this, tls_mode);
  std::vector<std::byte> final_output;
  if (limits_.handshake_limit_seconds > 0) {
    asio::steady_timer limit(socket_.get_executor(),
                             std::chrono::seconds(limits_.handshake_limit_seconds));
    auto done = co_await (handshake_steps(hs, final_output) ||
                          limit.async_wait(use_awaitable));
    if (done.index() == 1) {
      log_info("{}: handshake not finished within {} s, dropped", peer_,
               limits_.handshake_limit_seconds);
      co_return false;
    }
  } else {
    co_await handshake_steps(hs, final_output);
  }
  if (hs.phase() != nbd::Handshake::Phase::Transmission) {
    if (hs.phase() == nbd::Handshake::Phase::Closed)
      log_info("{}: handshake ended: {}", peer_, hs.close_reason());
    co_return false;
  }
  Negotiated negotiated = std::move(negotiated_);
  if (!negotiated.e ||
      negotiated.e->info(negotiated.session).name != hs.chosen_export().name)
    co_return false;
  if (!co_await wait_for_serving_slot()) co_return false;
  co_await handshake_write(final_output);
  export_ = std::move(negotiated.e);
  layer_ = export_->layer;
  if (export_->per_client) {
    std::string error;
    session_ = co_await open_session(negotiated.session, &error);
    if (!session_) {
      log_error("{}: cannot serve export '{}': {}", peer_, export_->name, error);
      co_return false;
    }
    layer_ = session_->layer;
  }

  if (tls_) {
    // Workers send from now on, straight to the socket, one at a time.
    co_await write_tls_output();
    tls_->use_direct_output();
    sender_.use_tls(tls_.get());
  }

  const nbd::ExportInfo& info = hs.chosen_export();
  state_.export_size = info.size;
  state_.transmission_flags = info.transmission_flags;
  if (!hs.structured_replies())
    state_.transmission_flags &= static_cast<uint16_t>(~nbd::kTransSendDf);
  state_.structured_replies = hs.structured_replies();
  state_.min_block_size = info.min_block_size;
  state_.max_payload = info.max_block_size;
  for (const auto& c : hs.selected_contexts()) {
    Context ctx;
    ctx.fixed = find_meta_context(c.name);
    if (!ctx.fixed)
      for (const auto& b : export_->bitmaps)
        if (b.context == c.name) ctx.bitmap = &b;
    if (!ctx.fixed && !ctx.bitmap) co_return false;
    if (ctx.fixed) contexts_map_extents_ = true;
    contexts_.push_back(ctx);
  }
  state_.meta_context_count = contexts_.size();
  log_info("{}: serving export '{}'{}", peer_, export_->name,
           state_.structured_replies ? " (structured replies)" : "");
  co_return true;
}

asio::awaitable<std::shared_ptr<Session>> Connection::open_session(
    std::string id, std::string* error) {
  auto strand = co_await asio::this_coro::executor;
  co_return co_await asio::async_initiate<decltype(use_awaitable),
                                          void(std::shared_ptr<Session>)>(
      [&](auto handler) {
        struct Work {
          decltype(handler) resume;
          std::shared_ptr<const Export> e;
          std::string id;
          std::string* error;
          decltype(strand) executor;
          // Keeps the loop running until the session is handed back.
          asio::executor_work_guard<decltype(strand)> busy;
        };
        auto w = std::make_shared<Work>(Work{std::move(handler), export_, std::move(id),
                                             error, strand,
                                             asio::make_work_guard(strand)});
        workers_.post([w] {
          std::shared_ptr<Session> s;
          try {
            s = w->e->open_session(w->id, w->error);
          } catch (const std::exception& ex) {
            *w->error = ex.what();
          }
          asio::post(w->executor, [w, s] { std::move(w->resume)(s); });
        });
      },
      use_awaitable);
}

asio::awaitable<void> Connection::wait_for_room(uint64_t bytes) {
  auto has_room = [&] {
    return in_flight_.load() < limits_.max_in_flight_requests &&
           (in_flight_bytes_.load() + bytes <= limits_.max_in_flight_bytes ||
            in_flight_bytes_.load() == 0);
  };
  // Dekker-style handshake with finish_request(): set the flag, then look
  // again, so a worker either sees the flag or we see its decrement.
  while (!has_room()) {
    flush_held_replies();
    reader_waiting_.store(true);
    if (has_room()) {
      reader_waiting_.store(false);
      break;
    }
    wake_.expires_at(asio::steady_timer::time_point::max());
    co_await wake_.async_wait(asio::as_tuple(use_awaitable));
  }
}

asio::awaitable<void> Connection::wait_until_idle() {
  while (in_flight_.load() != 0) {
    reader_waiting_.store(true);
    if (in_flight_.load() == 0) {
      reader_waiting_.store(false);
      break;
    }
    wake_.expires_at(asio::steady_timer::time_point::max());
    co_await wake_.async_wait(asio::as_tuple(use_awaitable));
  }
}

void Connection::finish_request(uint64_t bytes) {
  in_flight_bytes_.fetch_sub(bytes);
  in_flight_.fetch_sub(1);
  if (reader_waiting_.exchange(false)) {
    asio::post(socket_.get_executor(),
               [self = shared_from_this()] { self->wake_.cancel(); });
  }
}

bool Connection::try_read_inline(const nbd::RequestHeader& r) {
  const size_t header_size = state_.structured_replies
                                 ? nbd::kStructuredChunkHeaderSize + 8
                                 : nbd::kSimpleReplySize;
  std::span<std::byte> reply = sender_.hold_space(header_size + r.length);
  if (layer_->try_read_nowait(r.offset, reply.subspan(header_size)) ||
      (sends_holes(r) && has_zero_block(reply.subspan(header_size)))) {
    // Not cached, or a range that may hold zero clusters: a worker serves
    // it, sending zero ranges as holes (serve_sparse_read).
    sender_.drop_held();
    return false;
  }
  if (state_.structured_replies) {
    auto header = nbd::encode_offset_data_header(r.cookie, nbd::kReplyFlagDone,
                                                 r.offset, r.length);
    std::memcpy(reply.data(), header.data(), header.size());
  } else {
    auto header = nbd::encode_simple_reply(r.cookie, nbd::Error::Ok);
    std::memcpy(reply.data(), header.data(), header.size());
  }
  sender_.commit_held();
  flush_held_replies_if_full();
  return true;
}

bool Connection::try_serve_inline(const nbd::RequestHeader& r, Buffer* payload) {
  {
    auto section = loop_.try_enter_blocking();
    if (!section) return false;
    serve(r, payload, /*hold_reply=*/true);
  }
  flush_held_replies_if_full();
  return true;
}

asio::awaitable<void> Connection::transmission() {
  ReadBuffer reader(socket_, *this);
  std::array<std::byte, nbd::kRequestHeaderSize> header;
  auto self = shared_from_this();
  last_request_ = std::chrono::steady_clock::now();
  if (limits_.idle_timeout_seconds > 0) arm_idle_timer();
  while (!sender_.broken()) {
    co_await reader.read_exact(header);
    if (limits_.idle_timeout_seconds > 0) last_request_ = std::chrono::steady_clock::now();
    auto request = nbd::decode_request(header);
    if (!request) {
      log_info("{}: bad request magic, dropping connection", peer_);
      break;
    }
    const nbd::RequestHeader r = *request;
    client_activity::note_request();
    nbd::Validation v = nbd::validate_request(r, state_);
    if (v.error != nbd::Error::Ok) {
      log_info("{}: request type {} offset {} length {} refused: error {}",
               peer_, r.type, r.offset, r.length, static_cast<uint32_t>(v.error));
      // Consume a refused WRITE's payload before replying: a client may
      // not expect the reply to a request it has not finished sending.
      if (v.payload_to_skip && !v.drop_connection)
        co_await reader.skip(v.payload_to_skip);
      co_await wait_for_room(0);
      in_flight_.fetch_add(1);
      const bool structured_error =
          state_.structured_replies &&
          (r.type == static_cast<uint16_t>(nbd::Cmd::Read) ||
           r.type == static_cast<uint16_t>(nbd::Cmd::BlockStatus));
      const auto ec = std::error_code(static_cast<int>(v.error),
                                      std::generic_category());
      workers_.post([self, r, ec, structured_error] {
        if (structured_error)
          self->reply_structured_error(r.cookie, ec);
        else
          self->reply_simple(r.cookie, ec);
        self->finish_request(0);
      });
      if (v.drop_connection) break;
      continue;
    }
    if (r.type == static_cast<uint16_t>(nbd::Cmd::Disc)) {
      log_info("{}: client sent NBD_CMD_DISC", peer_);
      break;
    }
    if (r.type == static_cast<uint16_t>(nbd::Cmd::Read) &&
        r.length <= kMaxInlineRead && try_read_inline(r))
      continue;
    const bool is_write = r.type == static_cast<uint16_t>(nbd::Cmd::Write);
    const uint64_t payload_bytes = is_write ? r.length : 0;
    co_await wait_for_room(payload_bytes);
    Buffer* payload = nullptr;
    if (is_write) {
      payload = buffers_->acquire(r.length);
      try {
        co_await reader.read_exact(payload->span(r.length));
      } catch (...) {
        buffers_->release(payload);
        throw;
      }
    }
    in_flight_.fetch_add(1);
    in_flight_bytes_.fetch_add(payload_bytes);
    if (may_serve_inline(r) && try_serve_inline(r, payload)) continue;
    workers_.post([self, r, payload] { self->serve(r, payload); });
  }
}

bool Connection::may_serve_inline(const nbd::RequestHeader& r) const {
  const auto cmd = static_cast<nbd::Cmd>(r.type);
  if (cmd != nbd::Cmd::Write && cmd != nbd::Cmd::WriteZeroes &&
      cmd != nbd::Cmd::Trim)
    return false;
  // FUA means a flush: that waits for the disk, so it goes to a worker.
  if ((r.flags & nbd::kCmdFlagFua) || export_->policy.flush_every_write)
    return false;
  if (r.length > kMaxInlineWrite) return false;
  return layer_->capabilities().buffered_writes;
}

// --- Worker side (and inline writes) ----------------------------------------

void Connection::flush_held_replies() {
  if (!sender_.held_replies()) return;
  auto section = loop_.enter_blocking();
  sender_.send_held();
}

void Connection::flush_held_replies_if_full() {
  if (sender_.held_replies() >= kMaxHeldReplies ||
      sender_.held_bytes() >= kMaxHeldBytes)
    flush_held_replies();
}

void Connection::serve(const nbd::RequestHeader& r, Buffer* payload,
                       bool hold_reply) {
  const uint64_t payload_bytes = payload ? r.length : 0;
  try {
    Layer& layer = *layer_;
    const auto& policy = export_->policy;
    const bool fua = (r.flags & nbd::kCmdFlagFua) || policy.flush_every_write;
    switch (static_cast<nbd::Cmd>(r.type)) {
      case nbd::Cmd::Read:
        serve_read(r);
        break;
      case nbd::Cmd::Write:
        reply_simple(r.cookie, serve_write(r, payload->span(r.length)), hold_reply);
        break;
      case nbd::Cmd::WriteZeroes:
        reply_simple(r.cookie, serve_write_zeroes(r), hold_reply);
        break;
      case nbd::Cmd::Trim: {
        std::error_code ec;
        if (policy.discard_unmap) {
          ec = layer.trim(r.offset, r.length, fua);
          wrote_.store(true);
        } else if (fua && !policy.ignore_flush) {
          ec = layer.flush();
        }
        reply_simple(r.cookie, ec, hold_reply);
        break;
      }
      case nbd::Cmd::Flush:
        reply_simple(r.cookie,
                     policy.ignore_flush ? std::error_code{} : layer.flush());
        break;
      case nbd::Cmd::Cache:
        reply_simple(r.cookie, layer.cache(r.offset, r.length));
        break;
      case nbd::Cmd::BlockStatus:
        serve_block_status(r);
        break;
      default:
        reply_simple(r.cookie, std::make_error_code(std::errc::invalid_argument));
        break;
    }
  } catch (const std::exception& e) {
    log_error("{}: request failed: {}", peer_, e.what());
    reply_simple(r.cookie, std::make_error_code(std::errc::not_enough_memory));
  }
  if (payload) buffers_->release(payload);
  finish_request(payload_bytes);
}

std::error_code Connection::serve_write(const nbd::RequestHeader& r,
                                        std::span<const std::byte> data) {
  const auto& policy = export_->policy;
  const bool fua = (r.flags & nbd::kCmdFlagFua) || policy.flush_every_write;
  wrote_.store(true);
  if (policy.detect_zeroes != DetectZeroes::Off && all_zero(data)) {
    ZeroFlags f{.may_trim = policy.detect_zeroes == DetectZeroes::Unmap &&
                            policy.discard_unmap,
                .fast_only = false,
                .fua = fua};
    return layer_->write_zeroes(r.offset, data.size(), f);
  }
  return layer_->write(r.offset, data, fua);
}

std::error_code Connection::serve_write_zeroes(const nbd::RequestHeader& r) {
  const auto& policy = export_->policy;
  ZeroFlags f{.may_trim = !(r.flags & nbd::kCmdFlagNoHole) && policy.discard_unmap,
              .fast_only = (r.flags & nbd::kCmdFlagFastZero) != 0,
              .fua = (r.flags & nbd::kCmdFlagFua) || policy.flush_every_write};
  wrote_.store(true);
  return layer_->write_zeroes(r.offset, r.length, f);
}

bool Connection::sends_holes(const nbd::RequestHeader& r) const {
  return state_.structured_replies && !(r.flags & nbd::kCmdFlagDf) && r.length > 0 &&
         layer_->capabilities().cheap_block_status;
}

void Connection::serve_read(const nbd::RequestHeader& r) {
  if (sends_holes(r)) return serve_sparse_read(r);
  std::span<std::byte> data = read_scratch(r.length);
  std::error_code ec = layer_->read(r.offset, data);
  if (!state_.structured_replies) {
    auto header = nbd::encode_simple_reply(
        r.cookie, ec ? nbd::to_wire_error(ec) : nbd::Error::Ok);
    iovec iov[2] = {iov_of(header.data(), header.size()),
                    iov_of(data.data(), data.size())};
    sender_.send(iov, ec ? 1 : 2);
    return;
  }
  if (ec) {
    reply_structured_error(r.cookie, ec);
    return;
  }
  if (r.length == 0) {
    auto header = nbd::encode_chunk_header(r.cookie, nbd::kReplyFlagDone,
                                           nbd::ChunkType::None, 0);
    iovec iov[1] = {iov_of(header.data(), header.size())};
    sender_.send(iov, 1);
    return;
  }
  auto header = nbd::encode_offset_data_header(r.cookie, nbd::kReplyFlagDone,
                                               r.offset, r.length);
  iovec iov[2] = {iov_of(header.data(), header.size()),
                  iov_of(data.data(), data.size())};
  sender_.send(iov, 2);
}

void Connection::serve_sparse_read(const nbd::RequestHeader& r) {
  struct Chunk {
    uint64_t offset;
    uint32_t length;
    bool hole;
  };
  thread_local std::vector<Extent> extents(kMaxReadChunks);
  thread_local std::vector<Chunk> chunks;
  thread_local std::vector<std::array<std::byte, 32>> headers;
  thread_local std::vector<iovec> iov;
  Layer& layer = *layer_;

  // Split the range into zero and data runs; merge neighbours of a kind.
  chunks.clear();
  uint64_t offset = r.offset;
  const uint64_t end = r.offset + r.length;
  while (offset < end && chunks.size() + 1 < kMaxReadChunks) {
    size_t n = 0;
    if (layer.block_status(offset, end - offset,
                           std::span(extents).first(kMaxReadChunks - 1 - chunks.size()),
                           &n))
      break;  // the data path below reports real errors
    for (size_t i = 0; i < n; ++i) {
      uint32_t len = static_cast<uint32_t>(std::min(extents[i].length, end - offset));
      if (len == 0) break;
      if (!chunks.empty() && chunks.back().hole == extents[i].zero)
        chunks.back().length += len;
      else
        chunks.push_back({offset, len, extents[i].zero});
      offset += len;
    }
    if (n == 0) break;
  }
  if (offset < end) {
    if (!chunks.empty() && !chunks.back().hole)
      chunks.back().length += static_cast<uint32_t>(end - offset);
    else
      chunks.push_back({offset, static_cast<uint32_t>(end - offset), false});
  }

  std::span<std::byte> data = read_scratch(r.length);
  for (const Chunk& c : chunks) {
    if (c.hole) continue;
    auto part = data.subspan(c.offset - r.offset, c.length);
    if (auto ec = layer.read(c.offset, part)) return reply_structured_error(r.cookie, ec);
  }

  headers.resize(chunks.size());
  iov.clear();
  for (size_t i = 0; i < chunks.size(); ++i) {
    const Chunk& c = chunks[i];
    const uint16_t flags = i + 1 == chunks.size() ? nbd::kReplyFlagDone : 0;
    if (c.hole) {
      auto h = nbd::encode_offset_hole(r.cookie, flags, c.offset, c.length);
      std::memcpy(headers[i].data(), h.data(), h.size());
      iov.push_back(iov_of(headers[i].data(), h.size()));
    } else {
      auto h = nbd::encode_offset_data_header(r.cookie, flags, c.offset, c.length);
      std::memcpy(headers[i].data(), h.data(), h.size());
      iov.push_back(iov_of(headers[i].data(), h.size()));
      iov.push_back(iov_of(data.data() + (c.offset - r.offset), c.length));
    }
  }
  sender_.send(iov.data(), static_cast<int>(iov.size()));
}

// Descriptors of a dirty bitmap from `offset` for `length` bytes (at most
// `max` of them), as qemu's bitmap_to_extents: dirty runs are
// NBD_STATE_DIRTY, the rest 0, and bytes past the bitmap's image are clean.
// Appended to `out`, after (and never merged with) the descriptors of the
// contexts before.
static std::error_code bitmap_descriptors(
    const ExportedBitmap& b, uint64_t offset, uint64_t length, size_t max,
    std::vector<nbd::BlockStatusDescriptor>& out) {
  const uint64_t end = offset + length;
  const size_t first = out.size();
  auto add = [&](uint64_t len, uint32_t flags) {
    if (out.size() > first && out.back().flags == flags)
      out.back().length += static_cast<uint32_t>(len);
    else
      out.push_back({static_cast<uint32_t>(len), flags});
  };
  while (offset < end) {
    if (offset >= b.size) {
      if (out.size() - first == max && out.back().flags != 0) break;
      add(end - offset, 0);
      break;
    }
    qcow2::DirtyExtent d;
    if (auto ec = b.image->dirty_status(b.name, offset,
                                        std::min(end, b.size) - offset, &d))
      return ec;
    const uint32_t flags = d.dirty ? nbd::kStateDirty : 0u;
    if (out.size() - first == max && out.back().flags != flags) break;
    add(d.length, flags);
    offset += d.length;
  }
  return {};
}

void Connection::serve_block_status(const nbd::RequestHeader& r) {
  thread_local std::vector<Extent> extents(kMaxExtents);
  thread_local std::vector<nbd::BlockStatusDescriptor> descriptors;
  thread_local std::vector<size_t> ends;  // of each context's descriptors
  thread_local std::vector<std::byte> chunks;
  const bool req_one = (r.flags & nbd::kCmdFlagReqOne) != 0;

  // Gather the layer's extents once; every fixed context maps the same
  // list. Dirty bitmaps answer for themselves.
  size_t total = 0;
  uint64_t offset = r.offset;
  uint64_t remaining = contexts_map_extents_ ? r.length : 0;
  while (remaining > 0 && total < extents.size()) {
    size_t n = 0;
    std::error_code ec = layer_->block_status(
        offset, remaining, std::span(extents).subspan(total), &n);
    if (ec) {
      reply_structured_error(r.cookie, ec);
      return;
    }
    for (size_t i = total; i < total + n; ++i) {
      uint64_t len = std::min(extents[i].length, remaining);
      if (len == 0) {
        reply_structured_error(r.cookie, std::make_error_code(std::errc::io_error));
        return;
      }
      extents[i].length = len;
      offset += len;
      remaining -= len;
    }
    total += n;
    if (req_one) break;
  }

  descriptors.clear();
  ends.clear();
  for (const Context& ctx : contexts_) {
    const size_t first = descriptors.size();
    if (ctx.bitmap) {
      if (auto ec = bitmap_descriptors(*ctx.bitmap, r.offset, r.length,
                                       req_one ? 1 : kMaxExtents, descriptors)) {
        reply_structured_error(r.cookie, ec);
        return;
      }
    } else {
      for (size_t i = 0; i < total; ++i) {
        uint32_t flags = ctx.fixed->flags_of(extents[i]);
        uint32_t len = static_cast<uint32_t>(extents[i].length);
        if (descriptors.size() > first && descriptors.back().flags == flags)
          descriptors.back().length += len;
        else
          descriptors.push_back({len, flags});
        if (req_one) break;
      }
    }
    ends.push_back(descriptors.size());
  }

  thread_local std::vector<iovec> iov;
  size_t need = 0;
  for (size_t id = 0, first = 0; id < contexts_.size(); first = ends[id++])
    need += nbd::block_status_chunk_size(ends[id] - first);
  chunks.resize(need);
  iov.clear();
  size_t used = 0;
  for (size_t id = 0, first = 0; id < contexts_.size(); first = ends[id++]) {
    const uint16_t flags = id + 1 == contexts_.size() ? nbd::kReplyFlagDone : 0;
    size_t n = nbd::encode_block_status_chunk(
        r.cookie, flags, static_cast<uint32_t>(id),
        std::span(descriptors).subspan(first, ends[id] - first),
        std::span(chunks).subspan(used));
    iov.push_back(iov_of(chunks.data() + used, n));
    used += n;
  }
  sender_.send(iov.data(), static_cast<int>(iov.size()));
}

void Connection::reply_simple(uint64_t cookie, std::error_code ec, bool hold) {
  auto header = nbd::encode_simple_reply(
      cookie, ec ? nbd::to_wire_error(ec) : nbd::Error::Ok);
  iovec iov[1] = {iov_of(header.data(), header.size())};
  if (hold)
    sender_.hold(iov, 1);
  else
    sender_.send(iov, 1);
}

void Connection::reply_structured_error(uint64_t cookie, std::error_code ec) {
  auto chunk = nbd::encode_error_chunk(cookie, nbd::kReplyFlagDone,
                                       nbd::to_wire_error(ec));
  iovec iov[1] = {iov_of(chunk.data(), chunk.size())};
  sender_.send(iov, 1);
}

}  // namespace layerd
