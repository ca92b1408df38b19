/* matchlock guest agent: CONNECT channels, the guest end of published ports.
 *
 * A CONNECT opens a TCP connection to 127.0.0.1:PORT in the guest (loopback only) and relays
 * bytes both ways. Host -> socket: STDIN frames, at most STDIN_WINDOW unacknowledged (STDIN_ACK
 * once written), an empty one = half-close (shutdown SHUT_WR once drained). Socket -> host:
 * STDOUT frames, read only while fewer than STDIN_WINDOW bytes are unacknowledged by the
 * host's SOCK_ACK and a whole frame fits the outgoing buffer; the peer's EOF is SOCK_EOF. The
 * channel ends with RESULT: 0 once both directions are closed, else the errno that ended it.
 */
#include "agent.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct sock {
    struct sock *next;
    uint32_t chan;
    uint16_t port;
    int fd;
    bool connecting; /* a non-blocking connect is in progress */
    bool rd_eof;     /* the peer's EOF was sent to the host */
    bool host_eof;   /* the host half-closed: shut down writing once drained */
    bool wr_shut;    /* nothing more is written to the socket */
    int err;         /* non-zero: end the channel with this errno */
    uint32_t out_unacked; /* bytes sent to the host it did not acknowledge yet */
    uint8_t *in_buf;      /* host bytes not yet written: in_buf[in_off, in_off + in_len) */
    size_t in_off, in_len;
    int pfd; /* slot in this round's poll set, or -1 */
};

static struct sock *g_socks;
static uint8_t g_rdbuf[MAX_DATA];

static struct sock *sock_find(uint32_t chan)
{
    for (struct sock *s = g_socks; s; s = s->next)
        if (s->chan == chan) return s;
    return NULL;
}

bool port_exists(uint32_t chan) { return sock_find(chan) != NULL; }

static void fail(struct sock *s, int err)
{
    if (!s->err) s->err = err ? err : EIO;
}

static void send_ack(uint32_t chan, size_t n)
{
    uint8_t b[4];
    put_be32(b, (uint32_t)n);
    send_frame(F_STDIN_ACK, chan, b, 4, NULL, 0);
}

void port_connect(uint32_t chan, const uint8_t *p, size_t n)
{
    if (channel_busy(chan)) {
        agent_log("ignoring CONNECT on channel %u, which is in use", chan);
        return;
    }
    uint16_t port = n == 2 ? get_be16(p) : 0;
    if (!port) {
        send_result(chan, EINVAL, "malformed CONNECT");
        return;
    }
    struct sock *s = calloc(1, sizeof *s);
    if (!s) {
        send_result(chan, ENOMEM, "connect to port %u: out of memory", port);
        return;
    }
    s->chan = chan;
    s->port = port;
    s->pfd = -1;
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        fail(s, errno);
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (connect(s->fd, (struct sockaddr *)&a, sizeof a) == 0) {
            uint8_t zero[4] = {0};
            send_frame(F_STARTED, chan, zero, 4, NULL, 0);
        } else if (errno == EINPROGRESS) {
            s->connecting = true;
        } else {
            fail(s, errno);
        }
    }
    s->next = g_socks;
    g_socks = s;
}

/* Write buffered host bytes; acknowledge what was written, or dropped once the socket cannot
 * take more (the peer closed: its answer may still be readable, so reading goes on). */
static void sock_write(struct sock *s)
{
    size_t done = 0;
    while (s->in_len && !s->wr_shut) {
        ssize_t w = send(s->fd, s->in_buf + s->in_off, s->in_len, MSG_NOSIGNAL);
        if (w > 0) {
            s->in_off += (size_t)w;
            s->in_len -= (size_t)w;
            done += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && errno == EAGAIN) {
            break;
        } else {
            done += s->in_len;
            s->in_len = 0;
            s->wr_shut = true;
            shutdown(s->fd, SHUT_WR);
        }
    }
    if (!s->in_len) s->in_off = 0;
    if (done) send_ack(s->chan, done);
    if (s->host_eof && !s->in_len && !s->wr_shut) {
        shutdown(s->fd, SHUT_WR);
        s->wr_shut = true;
    }
}

void port_data(uint32_t chan, const uint8_t *p, size_t n)
{
    struct sock *s = sock_find(chan);
    if (!s || s->err) return;
    if (n == 0) {
        s->host_eof = true;
        if (!s->connecting) sock_write(s);
        return;
    }
    if (s->host_eof || n > MAX_DATA || s->in_len + n > STDIN_WINDOW) {
        agent_log("channel %u: data past the host's EOF or its window; closing", chan);
        fail(s, EPROTO);
        return;
    }
    if (s->wr_shut) { /* nowhere to go: consumed as dropped */
        send_ack(chan, n);
        return;
    }
    if (!s->in_buf && !(s->in_buf = malloc(STDIN_WINDOW))) {
        fail(s, ENOMEM);
        return;
    }
    if (s->in_off + s->in_len + n > STDIN_WINDOW) {
        memmove(s->in_buf, s->in_buf + s->in_off, s->in_len);
        s->in_off = 0;
    }
    memcpy(s->in_buf + s->in_off + s->in_len, p, n);
    s->in_len += n;
    if (!s->connecting) sock_write(s);
}

void port_ack(uint32_t chan, const uint8_t *p, size_t n)
{
    struct sock *s = sock_find(chan);
    if (!s) return;
    uint32_t k = n == 4 ? get_be32(p) : UINT32_MAX;
    if (k > s->out_unacked) {
        agent_log("channel %u: malformed SOCK_ACK; closing", chan);
        fail(s, EPROTO);
        return;
    }
    s->out_unacked -= k;
}

void port_kill(uint32_t chan)
{
    struct sock *s = sock_find(chan);
    if (!s) return;
    if (s->fd >= 0) { /* abort: the guest peer sees a reset, not an orderly end */
        struct linger l = {.l_onoff = 1, .l_linger = 0};
        setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    }
    fail(s, ECONNABORTED);
}

size_t port_poll_count(void)
{
    size_t n = 0;
    for (struct sock *s = g_socks; s; s = s->next) n++;
    return n;
}

size_t port_poll_fill(struct pollfd *pfd)
{
    size_t n = 0;
    bool room = out_data_room(), ctrl = out_free() >= CTRL_RESERVE;
    for (struct sock *s = g_socks; s; s = s->next) {
        s->pfd = -1;
        if (s->err || s->fd < 0) continue;
        short ev = 0;
        if (s->connecting) {
            ev = POLLOUT;
        } else {
            if (!s->rd_eof && room && s->out_unacked < STDIN_WINDOW) ev |= POLLIN;
            if (!s->wr_shut && s->in_len && ctrl) ev |= POLLOUT;
        }
        if (!ev) continue;
        s->pfd = (int)n;
        pfd[n++] = (struct pollfd){.fd = s->fd, .events = ev};
    }
    return n;
}

static void sock_read(struct sock *s)
{
    size_t want = STDIN_WINDOW - s->out_unacked;
    if (want > MAX_DATA) want = MAX_DATA;
    ssize_t r = recv(s->fd, g_rdbuf, want, 0);
    if (r > 0) {
        send_frame(F_STDOUT, s->chan, g_rdbuf, (size_t)r, NULL, 0);
        s->out_unacked += (uint32_t)r;
    } else if (r == 0) {
        s->rd_eof = true;
        send_frame(F_SOCK_EOF, s->chan, NULL, 0, NULL, 0);
    } else if (errno != EAGAIN && errno != EINTR) {
        fail(s, errno);
    }
}

static void sock_free(struct sock *s)
{
    if (s->fd >= 0) close(s->fd);
    free(s->in_buf);
    free(s);
}

void port_poll_handle(const struct pollfd *pfd)
{
    for (struct sock **pp = &g_socks; *pp;) {
        struct sock *s = *pp;
        short re = s->pfd >= 0 ? pfd[s->pfd].revents : 0;
        s->pfd = -1;
        if (re && s->connecting && !s->err) {
            int e = 0;
            socklen_t len = sizeof e;
            if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &e, &len) < 0) e = errno;
            if (e) {
                fail(s, e);
            } else {
                s->connecting = false;
                uint8_t zero[4] = {0};
                send_frame(F_STARTED, s->chan, zero, 4, NULL, 0);
                sock_write(s);
            }
        } else if (re && !s->err) {
            if (re & (POLLIN | POLLERR | POLLHUP) && !s->rd_eof && out_data_room() &&
                s->out_unacked < STDIN_WINDOW)
                sock_read(s);
            if (re & (POLLOUT | POLLERR | POLLHUP) && !s->err) sock_write(s);
        }
        /* RESULT ends the channel: on an error, or once both directions are closed. */
        if ((s->err || (s->rd_eof && s->wr_shut)) && out_free() >= CTRL_RESERVE) {
            if (s->err) {
                send_result(s->chan, s->err, "port %u: %s", s->port, strerror(s->err));
            } else {
                send_result(s->chan, 0, "%s", "");
            }
            *pp = s->next;
            sock_free(s);
        } else {
            pp = &s->next;
        }
    }
}

bool port_pending(void)
{
    if (out_free() < CTRL_RESERVE) return false; /* the port's POLLOUT wakes the loop */
    for (struct sock *s = g_socks; s; s = s->next)
        if (s->err || (s->rd_eof && s->wr_shut)) return true;
    return false;
}
