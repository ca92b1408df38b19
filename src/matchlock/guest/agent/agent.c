/* matchlock guest agent: frame I/O, dispatch and the single poll loop. See agent.h. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

bool g_stdio;
uint64_t g_nofile_soft;
/* A process that closes its stdin must not kill the agent: EPIPE is handled instead. */
const int g_ignored_signals[N_IGNORED_SIGNALS] = {SIGPIPE};

static int g_in = -1, g_out = -1; /* the port (one fd in a VM), or fds 0 and 1 with --stdio */
static int g_sigfd = -1;          /* signalfd for SIGCHLD: commands and the sandbox init */
/* In a VM the port reports a hang-up until the host connects; that only means "end of
 * session" once the host has spoken. g_port_wait parks the port for one short poll timeout. */
static bool g_host_seen;
static bool g_port_wait;

static uint8_t g_outbuf[OUT_CAP];
static size_t g_out_head, g_out_tail; /* queued bytes are g_outbuf[head, tail) */

/* Zero-copy output. A spliced frame's header is queued in g_outbuf; its payload waits in
 * g_mid (moved there from the process's pipe by splice, without a copy) and goes to the port
 * by a second splice, as the pipe's own pages, once the bytes queued before it were written:
 * g_outbuf[head, g_splice_at) is written, then g_splice_left bytes of g_mid, then the rest of
 * g_outbuf. One spliced payload at a time. The header's length is what the first splice
 * moved, so a splice cut short never breaks the framing.
 *
 * Only full payloads are spliced to the port: MAX_DATA bytes in g_mid's 16 slots, i.e. 16
 * whole pages. virtio-console's splice_write (Linux 6.1) sizes its scatterlist by the pipe's
 * buffer count and marks its end there, so a splice that leaves a buffer behind (an empty one,
 * which a process gets into its pipe with a write from a bad address, or any after it) hands
 * the virtqueue entries it never filled and overruns the descriptor table. 16 buffers holding
 * 64 KiB cannot include an empty or partial one, and all of them are taken. Anything shorter
 * (small or slow output) is read from g_mid into the frame like before. */
static int g_mid[2] = {-1, -1};
static bool g_splice_ok;     /* both splices work here (probed once, cleared on a failure) */
static size_t g_splice_at;   /* offset in g_outbuf where the payload belongs */
static size_t g_splice_left; /* payload bytes still in g_mid */
static uint32_t g_splice_chan;
/* g_mid holds this much, in MID_PIPE_BYTES / 4096 slots (see above). */
#define MID_PIPE_BYTES MAX_DATA

static uint8_t g_inbuf[HDR_SIZE + MAX_HOST_PAYLOAD];
static size_t g_in_len;
static uint64_t g_in_skip; /* bytes of a rejected frame still to discard */

/* ---- small helpers --------------------------------------------------------------------- */

uint16_t get_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
uint64_t get_be64(const uint8_t *p) { return (uint64_t)get_be32(p) << 32 | get_be32(p + 4); }
void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
void put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}
void put_be64(uint8_t *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

int tlv_next(struct tlv *t, struct tlv_field *f)
{
    if (t->off == t->len) return 0;
    if (t->len - t->off < 6) return -1;
    f->tag = get_be16(t->p + t->off);
    f->len = get_be32(t->p + t->off + 2);
    t->off += 6;
    if (f->len > t->len - t->off) return -1;
    f->val = t->p + t->off;
    t->off += f->len;
    return 1;
}

char *tlv_strdup(const struct tlv_field *f)
{
    if (memchr(f->val, 0, f->len)) {
        errno = EINVAL;
        return NULL;
    }
    char *s = malloc(f->len + 1);
    if (!s) return NULL;
    memcpy(s, f->val, f->len);
    s[f->len] = 0;
    return s;
}

/* Length of the strict UTF-8 sequence at s (as Python decodes it: no overlongs, no
 * surrogates, nothing past U+10FFFF), or 0 if s[0, n) does not start with one. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t k;
    uint32_t cp, min;
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) k = 1, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) k = 2, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) k = 3, cp = c & 0x07, min = 0x10000;
    else return 0;
    if (n <= k) return 0;
    for (size_t j = 1; j <= k; j++) {
        if ((s[j] & 0xC0) != 0x80) return 0;
        cp = cp << 6 | (s[j] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return k + 1;
}

bool utf8_valid(const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    for (size_t i = 0, k; i < n; i += k)
        if (!(k = utf8_seq(s + i, n - i))) return false;
    return true;
}

/* Messages quote host paths and may have been cut mid-character; the host rejects text that
 * is not UTF-8, so every invalid byte becomes '?'. */
static void utf8_sanitize(char *str, size_t n)
{
    unsigned char *s = (unsigned char *)str;
    for (size_t i = 0, k; i < n; i += k)
        if (!(k = utf8_seq(s + i, n - i))) s[i] = '?', k = 1;
}

/* ---- outgoing frames --------------------------------------------------------------------- */

size_t out_free(void) { return OUT_CAP - (g_out_tail - g_out_head); }

bool out_data_room(void) { return out_free() >= HDR_SIZE + MAX_DATA + CTRL_RESERVE; }

/* Make n contiguous bytes available at the tail (caller checked out_free() >= n). */
static uint8_t *out_tail_space(size_t n)
{
    if (OUT_CAP - g_out_tail < n) {
        memmove(g_outbuf, g_outbuf + g_out_head, g_out_tail - g_out_head);
        if (g_splice_left) g_splice_at -= g_out_head;
        g_out_tail -= g_out_head;
        g_out_head = 0;
    }
    return g_outbuf + g_out_tail;
}

static void put_header(uint8_t *h, uint8_t type, uint32_t chan, uint32_t len)
{
    h[0] = type;
    h[1] = h[2] = h[3] = 0;
    put_be32(h + 4, chan);
    put_be32(h + 8, len);
}

bool send_frame(uint8_t type, uint32_t chan, const void *a, size_t alen, const void *b,
                size_t blen)
{
    size_t total = HDR_SIZE + alen + blen;
    if (out_free() < total) {
        /* Only reachable for LOG lines when the host stopped reading; the console keeps it. */
        dprintf(2, "matchlock-agent: dropped frame 0x%02x on channel %u\n", type, chan);
        return false;
    }
    uint8_t *h = out_tail_space(total);
    put_header(h, type, chan, (uint32_t)(alen + blen));
    if (alen) memcpy(h + HDR_SIZE, a, alen);
    if (blen) memcpy(h + HDR_SIZE + alen, b, blen);
    g_out_tail += total;
    return true;
}

ssize_t send_from_fd(uint8_t type, uint32_t chan, int fd, size_t max)
{
    uint8_t *h = out_tail_space(HDR_SIZE + MAX_DATA);
    ssize_t n;
    if (max > MAX_DATA) max = MAX_DATA;
    do n = read(fd, h + HDR_SIZE, max);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        put_header(h, type, chan, (uint32_t)n);
        g_out_tail += HDR_SIZE + (size_t)n;
    }
    return n;
}

bool splice_ready(void) { return g_splice_ok && !g_splice_left; }

bool splice_pending(void) { return g_splice_left != 0; }

ssize_t send_spliced(uint8_t type, uint32_t chan, int fd, size_t max)
{
    if (max < MID_PIPE_BYTES) return send_from_fd(type, chan, fd, max); /* never spliced */
    max = MID_PIPE_BYTES;
    ssize_t n;
    do n = splice(fd, NULL, g_mid[1], NULL, max, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EINVAL) { /* not a pipe, or a kernel without pipe-to-pipe splice */
        agent_log("splice: %s; output is copied from now on", strerror(errno));
        g_splice_ok = false;
        return send_from_fd(type, chan, fd, max);
    }
    if (n <= 0) return n;
    if ((size_t)n == MID_PIPE_BYTES) { /* 16 full pages: to the port as they are */
        uint8_t *h = out_tail_space(HDR_SIZE);
        put_header(h, type, chan, (uint32_t)n);
        g_out_tail += HDR_SIZE;
        g_splice_at = g_out_tail;
        g_splice_left = (size_t)n;
        g_splice_chan = chan;
        return n;
    }
    /* A partial payload: copied into an ordinary frame (g_mid is left empty). */
    uint8_t *h = out_tail_space(HDR_SIZE + (size_t)n);
    size_t got = 0;
    while (got < (size_t)n) {
        ssize_t r = read(g_mid[0], h + HDR_SIZE + got, (size_t)n - got);
        if (r > 0) got += (size_t)r;
        else if (!(r < 0 && errno == EINTR)) break;
    }
    if (got < (size_t)n) { /* cannot happen: nothing else reads g_mid */
        agent_log("channel %u: output lost reading the splice pipe; killing the exec", chan);
        exec_kill(chan);
    }
    if (!got) {
        errno = EAGAIN; /* nothing queued */
        return -1;
    }
    put_header(h, type, chan, (uint32_t)got);
    g_out_tail += HDR_SIZE + got;
    return (ssize_t)got;
}

/* Format into msg (truncated to fit), made valid UTF-8 for the host's strict decoder. */
static __attribute__((format(printf, 2, 0))) size_t format_msg(char msg[MAX_LOG],
                                                              const char *fmt, va_list ap)
{
    int n = vsnprintf(msg, MAX_LOG, fmt, ap);
    size_t len = n < 0 ? 0 : (size_t)n >= MAX_LOG ? MAX_LOG - 1 : (size_t)n;
    utf8_sanitize(msg, len);
    return len;
}

void send_result(uint32_t chan, int err, const char *fmt, ...)
{
    char msg[MAX_LOG];
    va_list ap;
    va_start(ap, fmt);
    size_t len = format_msg(msg, fmt, ap);
    va_end(ap);
    uint8_t code[4];
    put_be32(code, (uint32_t)(err > 0 && err < 4096 ? err : err ? EIO : 0));
    send_frame(F_RESULT, chan, code, 4, msg, len);
}

void agent_log(const char *fmt, ...)
{
    char msg[MAX_LOG];
    va_list ap;
    va_start(ap, fmt);
    size_t len = format_msg(msg, fmt, ap);
    va_end(ap);
    dprintf(2, "matchlock-agent: %.*s\n", (int)len, msg);
    send_frame(F_LOG, 0, msg, len, NULL, 0);
}

/* OUTPUT_ACK of `n` bytes at p for a credited channel whose unacknowledged count is *unacked. */
void output_ack(uint32_t chan, size_t *unacked, const uint8_t *p, size_t n)
{
    uint32_t k = n == 4 ? get_be32(p) : 0;
    if (k == 0 || k > *unacked) {
        /* A host bug. Its own window check fails its session if we overrun; stalling the
         * channel forever would only hide the bug. */
        agent_log("channel %u: malformed OUTPUT_ACK (%u of %zu)", chan, k, *unacked);
        *unacked = 0;
        return;
    }
    *unacked -= k;
}

/* ---- shutdown ---------------------------------------------------------------------------- */

static __attribute__((noreturn)) void shutdown_agent(const char *why)
{
    dprintf(2, "matchlock-agent: shutting down: %s\n", why);
    exec_kill_all();
    if (g_stdio) _exit(0);
    power_off();
}

/* ---- incoming frames --------------------------------------------------------------------- */

bool channel_busy(uint32_t chan)
{
    return exec_exists(chan) || file_exists(chan) || port_exists(chan);
}

static void dispatch(uint8_t type, uint32_t chan, const uint8_t *p, size_t n)
{
    bool control;
    switch (type) {
    case F_SETUP:
    case F_PREPARE:
    case F_RESUME:
    case F_CA:
    case F_SHUTDOWN:
    case F_PING: control = true; break;
    case F_EXEC:
    case F_STDIN:
    case F_SIGNAL:
    case F_RESIZE:
    case F_KILL:
    case F_FILE_WRITE:
    case F_FILE_READ:
    case F_FILE_LIST:
    case F_FILE_DATA_IN:
    case F_CONNECT:
    case F_SOCK_ACK:
    case F_OUTPUT_ACK: control = false; break;
    default: agent_log("ignoring frame of unknown type 0x%02x on channel %u", type, chan); return;
    }
    if (control != (chan == 0)) {
        agent_log("ignoring frame 0x%02x on %s channel %u", type,
                  control ? "non-control" : "the control", chan);
        return;
    }
    switch (type) {
    case F_SETUP: handle_setup(p, n); break;
    case F_PREPARE: handle_prepare(p, n); break;
    case F_RESUME: handle_resume(p, n); break;
    case F_CA: handle_ca(p, n); break;
    case F_PING:
        if (n > MAX_PING) agent_log("ignoring PING of %zu bytes", n);
        else send_frame(F_PONG, 0, p, n, NULL, 0);
        break;
    case F_SHUTDOWN: shutdown_agent("SHUTDOWN from the host");
    case F_EXEC: exec_start(chan, p, n); break;
    case F_STDIN:
        if (port_exists(chan)) port_data(chan, p, n);
        else exec_stdin(chan, p, n);
        break;
    case F_SIGNAL: exec_signal(chan, p, n); break;
    case F_RESIZE: exec_resize(chan, p, n); break;
    case F_KILL:
        if (port_exists(chan)) port_kill(chan);
        else if (file_exists(chan)) file_kill(chan);
        else exec_kill(chan);
        break;
    case F_CONNECT: port_connect(chan, p, n); break;
    case F_SOCK_ACK: port_ack(chan, p, n); break;
    case F_OUTPUT_ACK:
        if (file_exists(chan)) file_output_ack(chan, p, n);
        else exec_output_ack(chan, p, n);
        break;
    case F_FILE_WRITE: file_write_begin(chan, p, n); break;
    case F_FILE_READ: file_read_begin(chan, p, n); break;
    case F_FILE_LIST: file_list_begin(chan, p, n); break;
    case F_FILE_DATA_IN: file_data(chan, p, n); break;
    }
}

/* Handle every complete frame in g_inbuf while replies are guaranteed to fit. */
static void parse_input(void)
{
    size_t pos = 0;
    for (;;) {
        if (g_in_skip) {
            size_t d = g_in_len - pos < g_in_skip ? g_in_len - pos : (size_t)g_in_skip;
            pos += d;
            g_in_skip -= d;
            if (g_in_skip) break;
        }
        if (g_in_len - pos < HDR_SIZE || out_free() < CTRL_RESERVE) break;
        const uint8_t *h = g_inbuf + pos;
        uint32_t chan = get_be32(h + 4), len = get_be32(h + 8);
        if (h[1] || h[2] || h[3] || len > MAX_HOST_PAYLOAD) {
            /* A host bug. Skipping the announced length keeps us in step if only the header's
             * content is wrong; the host's next PING tells whether we are. */
            agent_log("ignoring malformed frame header (type 0x%02x, reserved %02x%02x%02x, "
                      "length %u)", h[0], h[1], h[2], h[3], len);
            pos += HDR_SIZE;
            g_in_skip = len;
            continue;
        }
        if (g_in_len - pos < HDR_SIZE + len) break;
        dispatch(h[0], chan, h + HDR_SIZE, len);
        pos += HDR_SIZE + len;
    }
    memmove(g_inbuf, g_inbuf + pos, g_in_len - pos);
    g_in_len -= pos;
}

/* The port hung up or failed: before the host ever spoke that means "not connected yet". */
static void port_hangup(const char *why)
{
    if (!g_stdio && !g_host_seen) {
        g_port_wait = true;
        return;
    }
    shutdown_agent(why);
}

/* A virtio-serial read returns one port buffer (a page) at most: read on while there is
 * more, rather than going round the loop (and poll) once per page. Bounded, so that the
 * other fds are served while the host keeps sending. */
static void port_read(void)
{
    for (int i = 0; i < 64 && g_in_len < sizeof g_inbuf; i++) {
        ssize_t n = read(g_in, g_inbuf + g_in_len, sizeof g_inbuf - g_in_len);
        if (n > 0) {
            g_host_seen = true;
            g_in_len += (size_t)n;
            continue;
        }
        if (n == 0) port_hangup("the host closed the connection");
        else if (errno == EINTR) continue;
        else if (errno != EAGAIN) port_hangup("reading the port failed");
        return;
    }
}

/* Write all of buf to the port, waiting for it: only for the rare fallback below. */
static bool port_write_all(const uint8_t *buf, size_t len)
{
    while (len) {
        ssize_t n = write(g_out, buf, len);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = g_out, .events = POLLOUT};
            poll(&p, 1, 1000);
        } else if (n == 0 || errno != EINTR) {
            return false;
        }
    }
    return true;
}

/* The port refused a splice (or, in a kernel out of atomic memory, dropped its pages): the
 * payload still in g_mid is copied to the port instead, and output is copied from now on.
 * Bytes the kernel dropped cannot be recovered: zeros keep the stream in step for every other
 * channel, and the exec they belonged to is killed so its output is never taken as whole. */
static void splice_fallback(const char *why)
{
    static uint8_t buf[MAX_DATA];
    int avail = 0;
    if (ioctl(g_mid[0], FIONREAD, &avail) < 0 || avail < 0) avail = 0;
    size_t have = (size_t)avail < g_splice_left ? (size_t)avail : g_splice_left;
    size_t lost = g_splice_left - have;
    g_splice_ok = false;
    agent_log("splice to the port: %s; output is copied from now on", why);
    while (have) {
        ssize_t n = read(g_mid[0], buf, have < sizeof buf ? have : sizeof buf);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            lost += have;
            break;
        }
        have -= (size_t)n;
        if (!port_write_all(buf, (size_t)n)) port_hangup("writing the port failed");
    }
    g_splice_left = 0;
    if (!lost) return;
    memset(buf, 0, sizeof buf);
    for (size_t k; lost; lost -= k) {
        k = lost < sizeof buf ? lost : sizeof buf;
        if (!port_write_all(buf, k)) port_hangup("writing the port failed");
    }
    agent_log("channel %u: output lost in the kernel; killing the exec", g_splice_chan);
    exec_kill(g_splice_chan);
}

/* Move the pending spliced payload to the port; whether it is all gone. */
static bool splice_to_port(void)
{
    while (g_splice_left) {
        ssize_t n = splice(g_mid[0], NULL, g_out, NULL, g_splice_left,
                           SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        if (n > 0) {
            g_splice_left -= (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            return false;
        } else if (!(n < 0 && errno == EINTR)) {
            splice_fallback(n == 0 ? "bytes dropped" : strerror(errno));
        }
    }
    return true;
}

static void port_write(void)
{
    while (g_out_head < g_out_tail || g_splice_left) {
        size_t end = g_splice_left ? g_splice_at : g_out_tail;
        if (g_out_head == end) { /* the spliced payload's turn */
            if (!splice_to_port()) break;
            continue;
        }
        ssize_t n = write(g_out, g_outbuf + g_out_head, end - g_out_head);
        if (n > 0) {
            g_out_head += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            if (n < 0 && errno != EAGAIN) port_hangup("writing the port failed");
            break;
        }
    }
    if (g_out_head == g_out_tail && !g_splice_left) g_out_head = g_out_tail = 0;
}

/* Splice needs a kernel and a port that take it (virtio-console does; so do the pipes and
 * sockets of --stdio): an empty splice to the port fails at once (EINVAL) where they do not. */
static void splice_probe(void)
{
    if (pipe2(g_mid, O_CLOEXEC | O_NONBLOCK) < 0) return;
    /* Exactly 16 slots: a full payload is then 16 whole pages (see g_mid). */
    ssize_t n = fcntl(g_mid[0], F_SETPIPE_SZ, MID_PIPE_BYTES) == (int)MID_PIPE_BYTES
                    ? splice(g_mid[0], NULL, g_out, NULL, 1, SPLICE_F_NONBLOCK)
                    : (errno = ERANGE, -1);
    g_splice_ok = n == 0 || (n < 0 && errno == EAGAIN);
    if (!g_splice_ok) {
        dprintf(2, "matchlock-agent: no splice to the port (%s): output is copied\n",
                n < 0 ? strerror(errno) : "unexpected data");
        close(g_mid[0]);
        close(g_mid[1]);
        g_mid[0] = g_mid[1] = -1;
    }
}

static void drain_signalfd(void)
{
    struct signalfd_siginfo si[8];
    while (read(g_sigfd, si, sizeof si) > 0) {
    }
    exec_reap();
}

/* ---- the loop ---------------------------------------------------------------------------- */

enum { P_IN, P_OUT, P_SIG, P_FIXED };

static __attribute__((noreturn)) void serve(void)
{
    struct pollfd *pfd = NULL;
    size_t cap = 0;
    for (;;) {
        size_t need = P_FIXED + exec_poll_count() + port_poll_count();
        if (need > cap) {
            struct pollfd *np = realloc(pfd, need * sizeof *pfd);
            if (!np) {
                agent_log("out of memory for the poll set");
                sleep(1);
                continue;
            }
            pfd = np;
            cap = need;
        }
        /* Producers first: what they queue must be seen by the POLLOUT decision below. */
        bool busy = file_pump() | port_pending();
        bool parked = g_port_wait;
        g_port_wait = false;
        bool can_read = !parked && g_in_len < sizeof g_inbuf && out_free() >= CTRL_RESERVE;
        pfd[P_IN] = (struct pollfd){.fd = can_read ? g_in : -1, .events = POLLIN};
        bool pending = g_out_tail > g_out_head || g_splice_left;
        pfd[P_OUT] = (struct pollfd){.fd = !parked && pending ? g_out : -1, .events = POLLOUT};
        pfd[P_SIG] = (struct pollfd){.fd = g_sigfd, .events = POLLIN};
        size_t nexec = exec_poll_fill(pfd + P_FIXED);
        size_t n = P_FIXED + nexec;
        n += port_poll_fill(pfd + n);

        int64_t timeout = busy ? 0 : parked ? 50000 : -1; /* us */
        int64_t grace = exec_poll_timeout();
        if (grace >= 0 && (timeout < 0 || grace < timeout)) timeout = grace;
        struct timespec ts = {(time_t)(timeout / 1000000), (long)(timeout % 1000000) * 1000};
        if (ppoll(pfd, n, timeout < 0 ? NULL : &ts, NULL) < 0) {
            if (errno != EINTR) agent_log("poll: %s", strerror(errno));
            continue;
        }

        if (pfd[P_OUT].revents & POLLOUT) port_write();
        if (pfd[P_OUT].revents & (POLLERR | POLLHUP)) port_hangup("the port hung up");
        if (pfd[P_IN].revents & POLLIN) port_read();
        else if (pfd[P_IN].revents & (POLLERR | POLLHUP)) port_hangup("the port hung up");
        if (pfd[P_SIG].revents) drain_signalfd();
        exec_poll_handle(pfd + P_FIXED);
        port_poll_handle(pfd + P_FIXED + nexec);
        parse_input();
        if ((g_out_tail > g_out_head || g_splice_left) && !parked) port_write();
    }
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

int main(int argc, char **argv)
{
    g_stdio = argc > 1 && strcmp(argv[1], "--stdio") == 0;
    if (!g_stdio && getpid() != 1) {
        dprintf(2, "usage: %s --stdio   (without it, it must run as PID 1 of the VM)\n",
                argv[0]);
        return 2;
    }
    umask(022);
    for (size_t i = 0; i < N_IGNORED_SIGNALS; i++) signal(g_ignored_signals[i], SIG_IGN);
    /* Commands start on the agent's memory until their execve (exec.c: spawn_into_sandbox);
     * not dumpable, no process in the sandbox can reach it through /proc (mem, environ, fds)
     * in that window, whatever its uid and capabilities short of CAP_SYS_PTRACE. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    /* Commands and the sandbox init are reaped from the poll loop through a signalfd. */
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    g_sigfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);

    /* Each exec holds a few fds; the kernel's default soft limit of 1024 is needlessly low
     * for us (commands get the original back). */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        g_nofile_soft = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    if (g_stdio) {
        g_in = 0;
        g_out = 1;
        /* Orphans re-parent to us, as they would to PID 1 in a VM. */
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    } else {
        boot_pid1();
        g_in = g_out = open_port();
    }
    if (g_sigfd < 0) agent_log("signalfd: %s", strerror(errno));
    set_nonblock(g_in);
    set_nonblock(g_out);
    splice_probe();

    /* HELLO carries the boot clock so the host can tell VMM start-up from kernel boot. */
    struct timespec boot = {0, 0};
    clock_gettime(CLOCK_BOOTTIME, &boot);
    uint8_t hello[12];
    put_be32(hello, PROTOCOL_VERSION);
    put_be64(hello + 4, (uint64_t)boot.tv_sec * 1000000000u + (uint64_t)boot.tv_nsec);
    send_frame(F_HELLO, 0, hello, sizeof hello, AGENT_VERSION, strlen(AGENT_VERSION));
    serve();
}
