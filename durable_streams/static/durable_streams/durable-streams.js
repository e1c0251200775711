/**
 * durable-streams.js: follow a durable_streams stream over a WebSocket.
 *
 * A dependency-free ES module. Each value is reported once, in order, even across
 * dropped connections: the client counts offsets and, after a drop, reconnects
 * with a growing delay and asks the server for the next offset it needs.
 *
 * It acknowledges what it has received ({"type": "ack", "offset": next offset}) after
 * every 64 KiB or 256 entries, and 100 ms after an entry when fewer came: the server
 * sends only so much beyond the last acknowledgement (READER_WINDOW_BYTES).
 *
 * The server sends a heartbeat frame after READER_HEARTBEAT_SECONDS without any other
 * frame. A socket that stays silent for SILENT_BEATS heartbeats (or whose handshake
 * takes that long) is taken for lost, as a network outage or a stuck server leaves it
 * without a close: the client reports "lost", closes it and reconnects from its offset.
 *
 *   import { subscribe } from "/static/durable_streams/durable-streams.js";
 *
 *   const sub = subscribe(workflowId, "answer", {
 *     onEntry(value, offset) { output.append(value); },
 *     onClose(length) { console.log(`done after ${length} values`); },
 *     onInterrupted({ length, status }) { console.log(`${status} after ${length}; may resume`); },
 *     onError(error) { console.warn(error.message); },   // refused: 4400, 4403, 4404
 *   });
 *   // later, to stop listening: sub.close();
 */

/**
 * Close codes after which reconnecting cannot help. A stream the user may not read is
 * answered like a missing one (4404), so that ids cannot be probed; 4403 means the
 * user could read it when the socket opened, but may no longer.
 */
export const REFUSALS = Object.freeze({
  4400: "bad parameters",
  4403: "no longer allowed to read this stream",
  4404: "no such workflow, or not allowed to read it",
});

/** Close code of a client that left the server's window full: it reconnects from its offset. */
export const TOO_SLOW = 4408;

/**
 * Silence, in heartbeats, after which a connection counts as lost. The interval is the
 * `heartbeat` option until a heartbeat frame says what the server's is.
 */
export const SILENT_BEATS = 3;
export const HEARTBEAT = 15000;

/** An acknowledgement goes out after this many bytes or entries, or this many ms after an entry. */
export const ACK_BYTES = 64 * 1024;
export const ACK_ENTRIES = 256;
export const ACK_DELAY = 100;

/** The error reported when the server refuses a subscription. */
export class StreamRefused extends Error {
  constructor(code, reason) {
    super(`Stream refused (${code}): ${reason || REFUSALS[code] || "unknown reason"}`);
    this.name = "StreamRefused";
    this.code = code;
    this.reason = reason;
  }
}

/**
 * The WebSocket URL of one stream.
 * `path` is where the project mounted `durable_streams.routing` (default "/ws/durable-streams/").
 */
export function streamUrl(workflowId, key, { offset = 0, path = "/ws/durable-streams/", origin } = {}) {
  const base = new URL(origin || globalThis.location.href);
  const scheme = base.protocol === "https:" ? "wss:" : "ws:";
  const prefix = path.endsWith("/") ? path : `${path}/`;
  const address = `${encodeURIComponent(workflowId)}/${encodeURIComponent(key)}/`;
  return `${scheme}//${base.host}${prefix}${address}?offset=${offset}`;
}

function report(error) {
  // A failing callback must not stop the stream; surface it like an uncaught error.
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; });
}

/**
 * Subscribe to stream `key` of workflow `workflowId`.
 *
 * Options:
 *   offset    first offset wanted (default 0)
 *   onEntry   (value, offset) => void, once per value, in offset order
 *   onClose   (length) => void, once, after the last value: the stream never grows again
 *   onInterrupted  ({key, length, status}) => void, when the workflow was cancelled
 *             (status "CANCELLED") or failed ("ERROR") after `length` values. Not an
 *             end: the subscription stays open, and if the workflow is resumed, its new
 *             values (onEntry) and at last onClose follow. Call close() to stop waiting.
 *   onError   (error) => void, when the server refuses (error.code: 4400, 4403, 4404)
 *   onStatus  (state) => void: "connecting", "open", "interrupted", "lost" (nothing
 *             heard for SILENT_BEATS heartbeats: the socket is closed, "waiting"
 *             follows), "waiting" (to reconnect), "closed", "failed"
 *   heartbeat the server's heartbeat interval in milliseconds, READER_HEARTBEAT_SECONDS
 *             (15000), until its first heartbeat frame tells it
 *   path, origin   where the sockets are served (see streamUrl)
 *   minDelay, maxDelay   reconnection backoff bounds in milliseconds (250, 10000)
 *
 * Returns a Subscription: `.offset` (next offset wanted), `.state`, `.done` (a promise of
 * the final length, rejected on refusal) and `.close()`.
 */
export function subscribe(workflowId, key, options = {}) {
  return new Subscription(workflowId, key, options);
}

export class Subscription {
  constructor(workflowId, key, options = {}) {
    const offset = options.offset ?? 0;
    if (!Number.isInteger(offset) || offset < 0) {
      throw new RangeError(`offset must be a whole number of at least 0, not ${offset}`);
    }
    if (typeof workflowId !== "string" || !workflowId) throw new TypeError("workflowId must be a non-empty string");
    if (typeof key !== "string" || !key) throw new TypeError("key must be a non-empty string");
    this.workflowId = workflowId;
    this.key = key;
    this.options = options;
    this.minDelay = options.minDelay ?? 250;
    this.maxDelay = options.maxDelay ?? 10000;
    const heartbeat = options.heartbeat ?? HEARTBEAT;
    if (typeof heartbeat !== "number" || !Number.isFinite(heartbeat) || heartbeat <= 0) {
      throw new RangeError(`heartbeat must be a positive number of milliseconds, not ${heartbeat}`);
    }
    this._heartbeat = heartbeat;
    this._silence = null;
    this._offset = offset;
    this._state = "connecting";
    this._socket = null;
    this._timer = null;
    this._failures = 0;
    this._openedAt = 0;
    this._ended = false;
    this._interrupted = null; // the interruption last reported, until a value follows
    this._ackTimer = null;
    this._unackedBytes = 0;
    this._unackedEntries = 0;
    this.done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // Nobody may be waiting on `done`: do not report its rejection as unhandled.
    this.done.catch(() => {});
    this._wake = () => {
      if (this._state === "waiting") this._connect();
    };
    globalThis.addEventListener?.("online", this._wake);
    globalThis.document?.addEventListener?.("visibilitychange", this._wake);
    this._connect();
  }

  /** The next offset this subscription needs: the count of values reported so far, plus the start. */
  get offset() {
    return this._offset;
  }

  get state() {
    return this._state;
  }

  /** Stop for good: no more callbacks. */
  close() {
    this._finish("closed");
  }

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._call("onStatus", state);
  }

  _call(name, ...args) {
    const callback = this.options[name];
    if (typeof callback !== "function") return;
    try {
      callback(...args);
    } catch (error) {
      report(error);
    }
  }

  _connect() {
    clearTimeout(this._timer);
    this._timer = null;
    if (this._ended) return;
    this._setState("connecting");
    this._resetAcks();
    const WebSocketClass = this.options.WebSocket || globalThis.WebSocket;
    const url = streamUrl(this.workflowId, this.key, { ...this.options, offset: this._offset });
    let socket;
    try {
      socket = new WebSocketClass(url);
    } catch (error) {
      report(error);
      this._retry();
      return;
    }
    this._socket = socket;
    this._listen(socket); // a handshake that never ends is silence too
    socket.onopen = () => {
      if (socket !== this._socket) return;
      this._openedAt = Date.now();
      this._listen(socket);
      this._setState("open");
    };
    socket.onmessage = (event) => {
      if (socket !== this._socket) return;
      this._listen(socket);
      this._receive(socket, event.data);
    };
    socket.onclose = (event) => {
      if (socket !== this._socket) return;
      this._socket = null;
      this._stopListening();
      this._closed(event.code, event.reason);
    };
    socket.onerror = () => {}; // a close event follows
  }

  _listen(socket) {
    // Every frame, and the open, restarts the count of silent heartbeats.
    this._stopListening();
    this._silence = setTimeout(() => this._lost(socket), this._heartbeat * SILENT_BEATS);
  }

  _stopListening() {
    clearTimeout(this._silence);
    this._silence = null;
  }

  _lost(socket) {
    if (socket !== this._socket) return;
    // Heard nothing, not even a heartbeat: the network or the server is gone, and the
    // socket may never learn it. Give it up and reconnect from the offset we need.
    this._socket = null;
    if (this._openedAt && Date.now() - this._openedAt > 10000) this._failures = 0;
    this._setState("lost");
    try {
      socket.close();
    } catch {
      // Closing a socket that is still connecting may throw in some environments.
    }
    this._retry();
  }

  _receive(socket, data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      this._drop(socket);
      return;
    }
    if (message.type === "entry") {
      if (message.offset > this._offset) {
        this._drop(socket); // a gap: ask again from the offset we need
        return;
      }
      if (message.offset === this._offset) {
        this._offset = message.offset + 1;
        this._failures = 0;
        this._interrupted = null;
        if (this._state === "interrupted") this._setState("open"); // resumed
        this._call("onEntry", message.value, message.offset);
      } // else reported already
      this._received(socket, data.length);
    } else if (message.type === "interrupted") {
      if (message.length > this._offset) {
        this._drop(socket); // values are missing: ask again from the offset we need
        return;
      }
      // Not an end: the workflow failed or was cancelled, and may be resumed. The
      // socket stays open and the values of a resumed run follow on it.
      this._setState("interrupted");
      const said = this._interrupted;
      if (said && said.length === message.length && said.status === message.status) {
        return; // told again after a reconnection: reported already
      }
      this._interrupted = { key: this.key, length: message.length, status: message.status };
      this._call("onInterrupted", { ...this._interrupted });
    } else if (message.type === "heartbeat") {
      // A sign of life, and the server's interval: silence is measured against it.
      if (typeof message.interval === "number" && message.interval > 0) {
        this._heartbeat = message.interval * 1000;
        this._listen(socket);
      }
    } else if (message.type === "closed") {
      if (message.length > this._offset) {
        this._drop(socket);
        return;
      }
      this._finish("closed", message.length);
    }
  }

  _received(socket, size) {
    if (socket !== this._socket) return; // closed meanwhile, by a callback
    this._unackedBytes += size;
    this._unackedEntries += 1;
    if (this._unackedBytes >= ACK_BYTES || this._unackedEntries >= ACK_ENTRIES) {
      this._ack(socket);
    } else if (this._ackTimer === null) {
      this._ackTimer = setTimeout(() => this._ack(socket), ACK_DELAY);
    }
  }

  _ack(socket) {
    this._resetAcks();
    if (socket !== this._socket) return;
    try {
      socket.send(JSON.stringify({ type: "ack", offset: this._offset }));
    } catch {
      // The socket is closing: the reconnection asks for this offset anyway.
    }
  }

  _resetAcks() {
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    this._unackedBytes = 0;
    this._unackedEntries = 0;
  }

  _drop(socket) {
    // Something is off in what the server sent: start again from the offset we need.
    this._socket = null;
    socket.close();
    this._retry();
  }

  _closed(code, reason) {
    if (this._ended) return;
    if (code in REFUSALS) {
      this._finish("failed", undefined, new StreamRefused(code, reason));
      return;
    }
    // A connection that stayed up a while was healthy: start the backoff over. So was
    // one closed for a full window (the page was busy): come back without delay.
    if (code === TOO_SLOW || (this._openedAt && Date.now() - this._openedAt > 10000)) {
      this._failures = 0;
    }
    this._retry();
  }

  _retry() {
    this._stopListening();
    this._resetAcks();
    this._openedAt = 0;
    const delay = Math.min(this.maxDelay, this.minDelay * 2 ** this._failures);
    this._failures += 1;
    this._setState("waiting");
    // Jitter: a server restart must not bring every client back in the same millisecond.
    this._timer = setTimeout(() => this._connect(), delay * (0.5 + Math.random() / 2));
  }

  _finish(state, length, error) {
    if (this._ended) return;
    this._ended = true;
    clearTimeout(this._timer);
    this._stopListening();
    this._resetAcks();
    globalThis.removeEventListener?.("online", this._wake);
    globalThis.document?.removeEventListener?.("visibilitychange", this._wake);
    const socket = this._socket;
    this._socket = null;
    if (socket) socket.close(1000);
    this._setState(state);
    if (error) {
      this._call("onError", error);
      this._reject(error);
    } else if (length !== undefined) {
      this._call("onClose", length);
      this._resolve(length);
    } else {
      this._resolve(this._offset);
    }
  }
}
