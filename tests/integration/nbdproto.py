"""A minimal raw-socket NBD client (no libnbd), written from doc/proto.md.

Used to speak the protocol exactly as the Linux kernel client does and to
send malformed traffic.  Every socket has a timeout as a failure guard.
"""

import socket
import struct

# Handshake
NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
REPLY_MAGIC = 0x3E889045565A9            # option reply magic

FLAG_FIXED_NEWSTYLE = 1 << 0             # server handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0           # client flags
FLAG_C_NO_ZEROES = 1 << 1

# Options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_POLICY = REP_ERR + 2
REP_ERR_INVALID = REP_ERR + 3
REP_ERR_PLATFORM = REP_ERR + 4
REP_ERR_TLS_REQD = REP_ERR + 5
REP_ERR_UNKNOWN = REP_ERR + 6
REP_ERR_SHUTDOWN = REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8
REP_ERR_TOO_BIG = REP_ERR + 9

REP_NAMES = {
    REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO", REP_META_CONTEXT: "META_CONTEXT",
    REP_ERR_UNSUP: "ERR_UNSUP", REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "ERR_UNKNOWN", REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD", REP_ERR_TOO_BIG: "ERR_TOO_BIG",
}

# Info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# Transmission
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

SOCK_TIMEOUT = 30.0


class ProtocolError(AssertionError):
    pass


class Closed(ProtocolError):
    """The server closed the connection."""


def connect_unix(path, timeout=SOCK_TIMEOUT):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def connect_tcp(port, host="127.0.0.1", timeout=SOCK_TIMEOUT):
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise Closed(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock, limit=1 << 20):
    """Read until EOF; return what was read (bounded)."""
    buf = bytearray()
    while len(buf) < limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


class Client:
    """One NBD connection, driven step by step."""

    def __init__(self, sock):
        self.sock = sock
        self.hs_flags = None
        self.size = None
        self.tflags = None
        self.structured = False

    @classmethod
    def unix(cls, path):
        return cls(connect_unix(path))

    @classmethod
    def tcp(cls, port):
        return cls(connect_tcp(port))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # ---- handshake
    def read_greeting(self):
        data = recv_exact(self.sock, 18)
        magic, opt_magic, flags = struct.unpack(">QQH", data)
        if magic != NBDMAGIC:
            raise ProtocolError(f"bad server magic {magic:#x}")
        if opt_magic != IHAVEOPT:
            raise ProtocolError(f"server is not newstyle (magic {opt_magic:#x})")
        self.hs_flags = flags
        return flags

    def send_client_flags(self, flags):
        self.client_flags = flags
        self.sock.sendall(struct.pack(">I", flags))

    def handshake(self, fixed=True, no_zeroes=True):
        flags = self.read_greeting()
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("server does not offer fixed newstyle")
        cf = 0
        if fixed:
            cf |= FLAG_C_FIXED_NEWSTYLE
        if no_zeroes and flags & FLAG_NO_ZEROES:
            cf |= FLAG_C_NO_ZEROES
        self.send_client_flags(cf)
        return flags

    def send_option(self, opt, data=b""):
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def read_option_reply(self, expect_opt=None):
        hdr = recv_exact(self.sock, 20)
        magic, opt, rtype, length = struct.unpack(">QIII", hdr)
        if magic != REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        if expect_opt is not None and opt != expect_opt:
            raise ProtocolError(f"option reply for option {opt}, expected {expect_opt}")
        data = recv_exact(self.sock, length) if length else b""
        return rtype, data

    def option(self, opt, data=b""):
        """Send an option and collect replies until a final one (ACK or error)."""
        self.send_option(opt, data)
        replies = []
        while True:
            rtype, rdata = self.read_option_reply(opt)
            replies.append((rtype, rdata))
            if rtype == REP_ACK or rtype & REP_ERR:
                return replies

    @staticmethod
    def go_payload(name, infos=()):
        n = name.encode()
        return (struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) +
                b"".join(struct.pack(">H", i) for i in infos))

    def opt_info(self, name, infos=(), opt=OPT_INFO):
        """NBD_OPT_INFO/GO. Returns (final_type, {info_type: payload}, raw replies)."""
        replies = self.option(opt, self.go_payload(name, infos))
        info = {}
        for rtype, rdata in replies[:-1]:
            if rtype != REP_INFO:
                raise ProtocolError(f"unexpected reply {REP_NAMES.get(rtype, rtype)} to INFO/GO")
            if len(rdata) < 2:
                raise ProtocolError("REP_INFO shorter than 2 bytes")
            itype = struct.unpack(">H", rdata[:2])[0]
            if itype in info:
                raise ProtocolError(f"NBD_INFO type {itype} sent twice")
            info[itype] = rdata[2:]
        final = replies[-1][0]
        if final == REP_ACK and opt == OPT_GO:
            if INFO_EXPORT not in info:
                raise ProtocolError("GO acked without NBD_INFO_EXPORT")
            self.size, self.tflags = parse_info_export(info[INFO_EXPORT])
        return final, info, replies

    def opt_go(self, name, infos=()):
        return self.opt_info(name, infos, opt=OPT_GO)

    def opt_export_name(self, name):
        """NBD_OPT_EXPORT_NAME. Returns (size, tflags, zero_padding)."""
        self.send_option(OPT_EXPORT_NAME, name.encode())
        size, tflags = struct.unpack(">QH", recv_exact(self.sock, 10))
        pad = b""
        if not (getattr(self, "client_flags", 0) & FLAG_C_NO_ZEROES):
            pad = recv_exact(self.sock, 124)
        self.size, self.tflags = size, tflags
        return size, tflags, pad

    def opt_structured_reply(self):
        replies = self.option(OPT_STRUCTURED_REPLY)
        if replies[-1][0] == REP_ACK:
            self.structured = True
        return replies[-1][0]

    @staticmethod
    def meta_payload(name, queries):
        n = name.encode()
        out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
        for q in queries:
            qb = q.encode()
            out += struct.pack(">I", len(qb)) + qb
        return out

    def opt_meta_context(self, opt, name, queries):
        """LIST/SET_META_CONTEXT. Returns (final_type, [(id, name)])."""
        replies = self.option(opt, self.meta_payload(name, queries))
        ctxs = []
        for rtype, rdata in replies[:-1]:
            if rtype != REP_META_CONTEXT:
                raise ProtocolError(f"unexpected reply {REP_NAMES.get(rtype, rtype)} "
                                    "to META_CONTEXT")
            cid = struct.unpack(">I", rdata[:4])[0]
            ctxs.append((cid, rdata[4:].decode()))
        return replies[-1][0], ctxs

    # ---- transmission
    def send_request(self, cmd, handle, offset=0, length=0, flags=0, payload=b"",
                     magic=REQUEST_MAGIC):
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length)
                          + payload)

    def read_simple_reply(self, data_len=0):
        """Read one simple reply.  data_len: payload expected if no error."""
        magic, err, handle = struct.unpack(">IIQ", recv_exact(self.sock, 16))
        if magic != SIMPLE_REPLY_MAGIC:
            raise ProtocolError(f"expected simple reply magic, got {magic:#x}")
        data = recv_exact(self.sock, data_len) if (err == 0 and data_len) else b""
        return err, handle, data

    def read_reply_header(self):
        """Read the start of any reply. Returns ('simple', err, handle) or
        ('structured', flags, type, handle, length)."""
        magic = struct.unpack(">I", recv_exact(self.sock, 4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", recv_exact(self.sock, 12))
            return ("simple", err, handle)
        if magic == STRUCTURED_REPLY_MAGIC:
            flags, rtype, handle, length = struct.unpack(">HHQI", recv_exact(self.sock, 16))
            return ("structured", flags, rtype, handle, length)
        raise ProtocolError(f"bad reply magic {magic:#x}")

    def read_structured_reply(self, handle):
        """Read chunks for one handle until DONE (single outstanding request).

        Returns (error or 0, chunks) where chunks are (type, payload).
        """
        chunks = []
        err = 0
        while True:
            hdr = self.read_reply_header()
            if hdr[0] != "structured":
                # Simple reply to a non-read request is allowed.
                if hdr[2] != handle:
                    raise ProtocolError(f"reply for handle {hdr[2]:#x}, expected {handle:#x}")
                return hdr[1], [("simple", b"")]
            _, flags, rtype, h, length = hdr
            if h != handle:
                raise ProtocolError(f"chunk for handle {h:#x}, expected {handle:#x}")
            payload = recv_exact(self.sock, length) if length else b""
            chunks.append((rtype, payload))
            if rtype & (1 << 15):
                if len(payload) < 6:
                    raise ProtocolError("error chunk shorter than 6 bytes")
                err = err or struct.unpack(">I", payload[:4])[0]
            if flags & REPLY_FLAG_DONE:
                return err, chunks

    def read_cmd(self, offset, length, flags=0, handle=None):
        """READ with whichever reply style was negotiated. Returns (err, data)."""
        handle = handle if handle is not None else 0x5EAD0000 + (offset & 0xFFFF)
        self.send_request(CMD_READ, handle, offset, length, flags)
        if not self.structured:
            err, h, data = self.read_simple_reply(length)
            if h != handle:
                raise ProtocolError(f"reply handle {h:#x} != {handle:#x}")
            return err, data
        err, chunks = self.read_structured_reply(handle)
        if err:
            return err, b""
        buf = bytearray(length)
        covered = 0
        for rtype, payload in chunks:
            if rtype == REPLY_TYPE_OFFSET_DATA:
                off = struct.unpack(">Q", payload[:8])[0]
                d = payload[8:]
                if off < offset or off + len(d) > offset + length:
                    raise ProtocolError("data chunk outside the request")
                buf[off - offset:off - offset + len(d)] = d
                covered += len(d)
            elif rtype == REPLY_TYPE_OFFSET_HOLE:
                off, hl = struct.unpack(">QI", payload)
                if off < offset or off + hl > offset + length:
                    raise ProtocolError("hole chunk outside the request")
                buf[off - offset:off - offset + hl] = bytes(hl)
                covered += hl
            elif rtype == REPLY_TYPE_NONE:
                pass
            else:
                raise ProtocolError(f"unexpected chunk type {rtype} in READ reply")
        if covered != length:
            raise ProtocolError(f"READ reply covered {covered} of {length} bytes")
        return 0, bytes(buf)

    def simple_cmd(self, cmd, offset=0, length=0, flags=0, payload=b"", handle=0x1234):
        """A command without reply payload. Returns the error value."""
        self.send_request(cmd, handle, offset, length, flags, payload)
        if not self.structured:
            err, h, _ = self.read_simple_reply(0)
            if h != handle:
                raise ProtocolError(f"reply handle {h:#x} != {handle:#x}")
            return err
        err, _chunks = self.read_structured_reply(handle)
        return err

    def disconnect(self):
        """NBD_CMD_DISC, then expect the server to close (no reply)."""
        self.send_request(CMD_DISC, 0xD15C)
        rest = recv_until_eof(self.sock)
        if rest:
            raise ProtocolError(f"server sent {len(rest)} bytes after NBD_CMD_DISC")


def parse_info_export(payload):
    if len(payload) != 10:
        raise ProtocolError(f"NBD_INFO_EXPORT payload is {len(payload)} bytes, expected 10")
    return struct.unpack(">QH", payload)


def parse_block_size(payload):
    if len(payload) != 12:
        raise ProtocolError(f"NBD_INFO_BLOCK_SIZE payload is {len(payload)} bytes, expected 12")
    return struct.unpack(">III", payload)


def valid_handshake_bytes(export="disk", structured=False):
    """The client-side bytes of a complete, valid fixed-newstyle handshake
    ending in NBD_OPT_GO with no info requests (what the kernel sends)."""
    out = struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    if structured:
        out += struct.pack(">QII", IHAVEOPT, OPT_STRUCTURED_REPLY, 0)
    payload = Client.go_payload(export, ())
    out += struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload
    return out
