// One client connection: the handshake, then the transmission phase.
//
// Threading model. All socket reads happen in one coroutine on the
// connection's strand of the server's event loop: it reads request headers
// (many per recv when the client pipelines), validates them, reads WRITE
// payloads into pooled buffers and posts each request to the worker pool.
// A worker runs the request against the export's Layer (blocking
// pread/pwrite) and sends the reply itself in one gathered sendmsg
// (ReplySender serializes them), so replies leave in completion order and
// a slow request never holds up the others. Two kinds of request skip the
// hand-off, which costs more than they do: small READs whose data is
// already in memory (Layer::try_read_nowait) and, when the layer writes
// to the page cache, WRITE, WRITE_ZEROES and TRIM without FUA. The loop
// thread serves those itself, the writes inside a LoopThreads blocking
// section, so that if one does block another thread takes over the loop
// and the worker pool gets the writes for a while. The reader stops
// reading when too many requests or payload bytes are in flight
// (back-pressure), and the connection closes only after every in-flight
// request has replied.
//
// TLS (server/tls.h): NBD_OPT_STARTTLS upgrades the socket in the middle
// of the handshake, inside its time limit. From then on the reader
// decrypts with TlsSession::recv (waiting for input with a one-byte
// MSG_PEEK through Asio, which sees every readiness change), handshake
// replies are written through Asio from the session's buffered output, and
// in the transmission phase ReplySender is the session's only sender.
// Without TLS every read and send is the plain one, unchanged.
//
// Limits. The handshake must finish within handshake_limit_seconds; then
// the connection asks the server's ClientSlots for a serving slot (-e) and
// holds its final handshake reply until it has one (that wait is not timed:
// the client is not at fault). A served client that sends nothing for
// idle_timeout_seconds, with nothing in flight, is disconnected. The reader
// admits at most max_in_flight_requests requests, and max_in_flight_bytes
// of WRITE payloads in flight, at once (a single larger request is
// admitted alone). READ data needs no such bound: it is read into each
// worker's scratch buffer, so the worker pool bounds it.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <vector>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>

#include "nbd/codec.h"
#include "nbd/handshake.h"
#include "server/client_slots.h"
#include "server/export.h"
#include "server/loop_threads.h"
#include "server/meta_context.h"
#include "server/reply_sender.h"
#include "server/tls.h"
#include "server/worker_pool.h"

namespace layerd {

struct ConnectionLimits {
  uint32_t handshake_limit_seconds = 10;  // 0: no limit
  uint32_t idle_timeout_seconds = 0;      // 0: no limit
  uint32_t max_in_flight_requests = 128;
  uint64_t max_in_flight_bytes = 64u << 20;
};

class Connection : public std::enable_shared_from_this<Connection>,
                   private nbd::HandshakeHost {
 public:
  using Socket = boost::asio::generic::stream_protocol::socket;

  // `socket` should have a strand as its executor: the connection's
  // handlers run there. `slots` and `tls` (null: no TLS) must outlive
  // the connection.
  Connection(Socket socket, const ExportRegistry& exports,
             WorkerPool& workers, LoopThreads& loop, ClientSlots& slots,
             ConnectionLimits limits, std::string peer,
             const TlsCredentials* tls = nullptr);
  ~Connection() override;

  // Runs the whole connection on the socket's executor. Returns once the
  // socket is closed and no request is in flight.
  boost::asio::awaitable<void> run();

  // Asks the connection to finish: no more requests are read, in-flight
  // ones complete and reply. Call on executor().
  void stop();
  // Drops the connection at once (logging `why`): reads and writes end,
  // a wait for a serving slot ends. Call on executor().
  void drop(const char* why);

  Socket::executor_type executor() { return socket_.get_executor(); }

  const std::string& peer() const { return peer_; }

 private:
  class Buffer;
  class BufferPool;
  class ReadBuffer;

  // nbd::HandshakeHost
  std::optional<nbd::ExportInfo> find_export(std::string_view name) override;
  std::vector<nbd::ExportInfo> list_exports() override;
  std::vector<std::string> meta_contexts(const nbd::ExportInfo& e) override;

  boost::asio::awaitable<bool> handshake();
  // Registers with slots_ as negotiating; a drop from there drops this.
  void start_negotiating();
  // Waits until slots_ gives this connection a serving slot; false if it
  // was dropped or stopped first.
  boost::asio::awaitable<bool> wait_for_serving_slot();
  // Disconnects a served client idle for limits_.idle_timeout_seconds.
  void arm_idle_timer();
  // The export's session `id` (per-client overlays), made on a worker.
  boost::asio::awaitable<std::shared_ptr<Session>> open_session(
      std::string id, std::string* error);
  // Runs the handshake until it ends; the output that ends it in the
  // Transmission phase is left in `final_output` (sent once served).
  boost::asio::awaitable<void> handshake_steps(nbd::Handshake& hs,
                                               std::vector<std::byte>& final_output);
  // Handshake I/O, through TLS once it is up.
  boost::asio::awaitable<void> handshake_read(std::span<std::byte> in);
  boost::asio::awaitable<void> handshake_write(std::span<const std::byte> out);
  // After STARTTLS was acknowledged: the TLS handshake. False (logged) if
  // it failed.
  boost::asio::awaitable<bool> start_tls();
  // Writes TLS's buffered output (the handshake phase's).
  boost::asio::awaitable<void> write_tls_output();
  // Some decrypted bytes (at least one); throws at the client's end.
  boost::asio::awaitable<size_t> tls_read_some(std::span<std::byte> out);
  // Until the socket has input (or EOF), consuming none of it.
  boost::asio::awaitable<void> wait_readable();
  boost::asio::awaitable<void> transmission();
  boost::asio::awaitable<void> wait_for_room(uint64_t bytes);
  boost::asio::awaitable<void> wait_until_idle();
  // Answers a READ on the loop thread if it can without blocking (the
  // reply is held, see ReplySender); false if a worker must serve it.
  bool try_read_inline(const nbd::RequestHeader& r);
  // Whether `r` (a valid request) may be served on the loop thread in a
  // blocking section rather than by a worker.
  bool may_serve_inline(const nbd::RequestHeader& r) const;
  // Serves `r` on the loop thread in a blocking section, its reply held;
  // false (nothing done) if blocking here is declined right now.
  bool try_serve_inline(const nbd::RequestHeader& r, Buffer* payload);

  // Worker side.
  // Runs `r` and replies; with `hold_reply` (on the connection's strand)
  // a simple reply is held back for flush_held_replies().
  void serve(const nbd::RequestHeader& r, Buffer* payload, bool hold_reply = false);
  // Sends replies held by serve(); before the reader waits for anything.
  void flush_held_replies();
  // The same once enough replies or bytes are held.
  void flush_held_replies_if_full();
  // Whether a READ is answered with zero ranges as hole chunks.
  bool sends_holes(const nbd::RequestHeader& r) const;
  void serve_read(const nbd::RequestHeader& r);
  void serve_sparse_read(const nbd::RequestHeader& r);
  void serve_block_status(const nbd::RequestHeader& r);
  std::error_code serve_write(const nbd::RequestHeader& r,
                              std::span<const std::byte> data);
  std::error_code serve_write_zeroes(const nbd::RequestHeader& r);
  void reply_simple(uint64_t cookie, std::error_code ec, bool hold = false);
  void reply_structured_error(uint64_t cookie, std::error_code ec);
  void finish_request(uint64_t bytes);

  Socket socket_;
  int fd_;
  const ExportRegistry& exports_;
  WorkerPool& workers_;
  LoopThreads& loop_;
  ClientSlots& slots_;
  uint64_t slot_id_ = 0;
  bool slot_granted_ = false;  // strand only
  ConnectionLimits limits_;
  std::string peer_;
  const TlsCredentials* tls_credentials_;
  std::unique_ptr<TlsSession> tls_;  // once STARTTLS began

  // The export the handshake looked up last, by the name the client used
  // (the handshake asks for the export of each INFO, GO or meta-context
  // option just before it answers), so the connection serves exactly the
  // export it was told about.
  struct Negotiated {
    std::string name;
    std::shared_ptr<const Export> e;
    std::string session;
  } negotiated_;
  std::shared_ptr<const Export> export_;
  std::shared_ptr<Session> session_;  // per-client overlays only
  std::shared_ptr<Layer> layer_;      // what this connection serves
  nbd::TransmissionState state_;
  // A selected meta context (by context id): a fixed one that maps the
  // layer's extents, or one of the export's dirty bitmaps (-B).
  struct Context {
    const MetaContext* fixed = nullptr;
    const ExportedBitmap* bitmap = nullptr;
  };
  std::vector<Context> contexts_;
  bool contexts_map_extents_ = false;  // some context maps the layer's extents

  std::unique_ptr<BufferPool> buffers_;
  ReplySender sender_;
  std::atomic<bool> wrote_{false};
  bool stopping_ = false;

  // Back-pressure between workers and the reader (see wait_for_room).
  std::atomic<uint32_t> in_flight_{0};
  std::atomic<uint64_t> in_flight_bytes_{0};
  std::atomic<bool> reader_waiting_{false};
  // Wakes the coroutine of run() from its waits (room, idle, a slot).
  boost::asio::steady_timer wake_;
  // Idle timeout: when the reader last took a request (reader only).
  std::chrono::steady_clock::time_point last_request_;
  boost::asio::steady_timer idle_timer_;
};

}  // namespace layerd
