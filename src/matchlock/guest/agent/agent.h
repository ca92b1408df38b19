/* matchlock guest agent: shared definitions.
 *
 * The agent is PID 1 of the microVM. It speaks the protocol of docs/guest-protocol.md over one
 * virtio-serial port and runs everything from a single poll loop (no threads):
 *   agent.c  frames in and out, the poll loop, shutdown
 *   setup.c  PID-1 boot mounts and the SETUP request (root switch, hostname, clock, entropy)
 *   exec.c   EXEC: the sandbox's PID+mount namespace, hardening, user switch, stdio plumbing
 *   files.c  FILE_WRITE / FILE_READ / FILE_LIST
 *   ports.c  CONNECT: relays a host connection to a TCP port on the guest's loopback
 */
#ifndef MATCHLOCK_AGENT_H
#define MATCHLOCK_AGENT_H

#define _GNU_SOURCE
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct pollfd;

#define AGENT_VERSION "matchlock-agent/0.1.0"
#define PROTOCOL_VERSION 1u

/* Limits from docs/guest-protocol.md. */
#define HDR_SIZE 12u
#define MAX_HOST_PAYLOAD (1u << 20)
#define MAX_DATA 65536u
#define STDIN_WINDOW 262144u
/* Credit per exec for STDOUT + STDERR frames, each costing its payload + OUTPUT_FRAME_COST;
 * the host returns it with OUTPUT_ACK as its consumer takes the output. */
#define OUTPUT_WINDOW (1u << 20)
#define OUTPUT_FRAME_COST 64u

/* Payload bytes a credited channel (an exec's output, a file read) may send now: 0 once the
 * host's unacknowledged frames fill OUTPUT_WINDOW. */
static inline size_t output_credit(size_t unacked)
{
    return unacked + OUTPUT_FRAME_COST < OUTPUT_WINDOW ? OUTPUT_WINDOW - unacked - OUTPUT_FRAME_COST
                                                       : 0;
}
#define MAX_LOG 4096u
#define MAX_PING 64u

/* Outgoing frames are queued in one bounded buffer. Process output and file data are only
 * read while a whole data frame fits with CTRL_RESERVE to spare, and host frames are only
 * handled while CTRL_RESERVE is free, so replies (RESULT, STARTED, ...) always fit. */
#define OUT_CAP (256u * 1024u)
#define CTRL_RESERVE (16u * 1024u)

enum frame_type {
    F_SETUP = 0x01,
    F_EXEC = 0x02,
    F_STDIN = 0x03,
    F_SIGNAL = 0x04,
    F_RESIZE = 0x05,
    F_FILE_WRITE = 0x06,
    F_FILE_READ = 0x07,
    F_FILE_LIST = 0x08,
    F_FILE_DATA_IN = 0x09,
    F_SHUTDOWN = 0x0A,
    F_PING = 0x0B,
    F_KILL = 0x0C,
    F_CONNECT = 0x0D,
    F_SOCK_ACK = 0x0E,
    F_OUTPUT_ACK = 0x0F,
    F_PREPARE = 0x10,
    F_RESUME = 0x11,
    F_CA = 0x12,

    F_HELLO = 0x81,
    F_STDOUT = 0x82,
    F_STDERR = 0x83,
    F_EXIT = 0x84,
    F_STDIN_ACK = 0x85,
    F_FILE_DATA = 0x86,
    F_DIRENT = 0x87,
    F_RESULT = 0x88,
    F_PONG = 0x89,
    F_LOG = 0x8A,
    F_STARTED = 0x8B,
    F_SOCK_EOF = 0x8C,
};

enum setup_tag {
    SETUP_HOSTNAME = 1,
    SETUP_ROOT_DEV = 2,
    SETUP_UPPER_DEV = 3,
    SETUP_CLOCK_NS = 4,
    SETUP_ENTROPY = 5,
    SETUP_HOSTS_LINE = 6,
    SETUP_RESOLV = 7,
    SETUP_CPU_QUOTA = 8,
    SETUP_NET = 9,
    SETUP_MOUNT = 10,
    SETUP_DISK = 11,
    SETUP_CA = 12,
    SETUP_WARM_ARG = 13, /* PREPARE only: one argv element of the warm-up command */
};

enum exec_tag {
    EXEC_ARG = 1,
    EXEC_ENV = 2,
    EXEC_CWD = 3,
    EXEC_USER = 4,
    EXEC_FLAGS = 5,
    EXEC_ROWS = 6,
    EXEC_COLS = 7,
};

enum file_tag {
    FILE_PATH = 1,
    FILE_MODE = 2,
    FILE_NAME = 3,
    FILE_SIZE = 4,
    FILE_MTIME = 5,
};

#define EXEC_FLAG_TTY 1u
#define EXEC_FLAG_PRIVILEGED 2u
#define EXEC_FLAG_STDIN 4u

/* ---- agent.c ---------------------------------------------------------------------------- */

extern bool g_stdio; /* --stdio test mode: no PID-1 duties, SETUP is a no-op */
extern uint64_t g_nofile_soft; /* RLIMIT_NOFILE soft limit we started with, for commands */
/* The signals the agent ignores: every command gets them back at their default. */
#define N_IGNORED_SIGNALS 1
extern const int g_ignored_signals[N_IGNORED_SIGNALS];

uint16_t get_be16(const uint8_t *p);
uint32_t get_be32(const uint8_t *p);
uint64_t get_be64(const uint8_t *p);
void put_be16(uint8_t *p, uint16_t v);
void put_be32(uint8_t *p, uint32_t v);
void put_be64(uint8_t *p, uint64_t v);

/* TLV reader over a host payload. tlv_next returns 1 with a field, 0 at the end, -1 when a
 * field runs past the payload. */
struct tlv {
    const uint8_t *p;
    size_t len, off;
};
struct tlv_field {
    uint16_t tag;
    uint32_t len;
    const uint8_t *val;
};
int tlv_next(struct tlv *t, struct tlv_field *f);
/* A TLV string as a fresh NUL-terminated copy; NULL (errno EINVAL) if it contains a NUL. */
char *tlv_strdup(const struct tlv_field *f);

bool utf8_valid(const char *s, size_t n);

/* Free space in the outgoing buffer, and whether a full data frame may be queued now. */
size_t out_free(void);
bool out_data_room(void);
/* Queue a frame made of up to two payload parts; false (frame dropped) if it does not fit. */
bool send_frame(uint8_t type, uint32_t chan, const void *a, size_t alen, const void *b,
                size_t blen);
/* Read up to max (<= MAX_DATA) bytes of fd straight into a queued data frame; returns read()'s
 * result. Only call when out_data_room(). */
ssize_t send_from_fd(uint8_t type, uint32_t chan, int fd, size_t max);
/* Zero-copy output (agent.c): move up to max (<= MAX_DATA) bytes from the pipe fd into a data
 * frame whose payload the port takes straight from the pipe's pages (splice), the header being
 * queued like any frame; returns the bytes moved, 0 at EOF, -1 with errno (EAGAIN: nothing
 * there). Only call when out_data_room() and splice_ready(); falls back to send_from_fd by
 * itself where the kernel cannot splice. */
ssize_t send_spliced(uint8_t type, uint32_t chan, int fd, size_t max);
/* Output may be spliced now (supported, and no spliced payload still waiting for the port). */
bool splice_ready(void);
/* A spliced payload is still waiting for the port: no other output may be read meanwhile. */
bool splice_pending(void);
void send_result(uint32_t chan, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void agent_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void output_ack(uint32_t chan, size_t *unacked, const uint8_t *p, size_t n);
/* Is channel chan in use by an exec or a file operation? */
bool channel_busy(uint32_t chan);

/* ---- setup.c ----------------------------------------------------------------------------- */

void boot_pid1(void);
int open_port(void);
void handle_setup(const uint8_t *p, size_t n);
void handle_prepare(const uint8_t *p, size_t n);
void handle_resume(const uint8_t *p, size_t n);
void handle_ca(const uint8_t *p, size_t n);
__attribute__((noreturn)) void power_off(void);

/* ---- exec.c ------------------------------------------------------------------------------ */

void exec_start(uint32_t chan, const uint8_t *p, size_t n);
void exec_stdin(uint32_t chan, const uint8_t *p, size_t n);
void exec_signal(uint32_t chan, const uint8_t *p, size_t n);
void exec_resize(uint32_t chan, const uint8_t *p, size_t n);
void exec_kill(uint32_t chan);
void exec_output_ack(uint32_t chan, const uint8_t *p, size_t n);
bool exec_exists(uint32_t chan);
size_t exec_poll_count(void);
size_t exec_poll_fill(struct pollfd *pfd);
void exec_poll_handle(const struct pollfd *pfd);
/* Microseconds until an exec needs attention without any fd event (a drain grace, an output
 * hold), or -1. */
int64_t exec_poll_timeout(void);
void exec_reap(void);
void exec_kill_all(void);
/* Start the sandbox init (PID 1 of the execs' namespaces) unless it runs; 0, or -1 with a
 * reason in why. sandbox_drop ends it (the next exec starts a new one). */
int sandbox_ensure(char *why, size_t wsz);
void sandbox_drop(void);
/* PREPARE's warm-up: run argv once in the sandbox and end it, with whatever it left running,
 * then start a fresh sandbox init; 0, or -1 with a reason in why (the init could not start). */
int sandbox_warm(char **argv, int timeout_ms, char *why, size_t wsz);

/* ---- files.c ----------------------------------------------------------------------------- */

void file_write_begin(uint32_t chan, const uint8_t *p, size_t n);
void file_data(uint32_t chan, const uint8_t *p, size_t n);
void file_read_begin(uint32_t chan, const uint8_t *p, size_t n);
void file_list_begin(uint32_t chan, const uint8_t *p, size_t n);
bool file_exists(uint32_t chan);
/* mkdir -p of the directory part of path (0755); path is modified and restored. */
int make_parents(char *path);
/* KILL on a file channel: abandon the operation (a write leaves no file), RESULT ECANCELED. */
void file_kill(uint32_t chan);
/* OUTPUT_ACK on a FILE_READ channel: credit for its FILE_DATA frames. */
void file_output_ack(uint32_t chan, const uint8_t *p, size_t n);
/* Produce FILE_DATA/DIRENT frames while there is room; true if work remains that can proceed
 * without waiting for any fd (so the poll loop must not sleep). */
bool file_pump(void);

/* ---- ports.c ----------------------------------------------------------------------------- */

void port_connect(uint32_t chan, const uint8_t *p, size_t n);
void port_data(uint32_t chan, const uint8_t *p, size_t n);
void port_ack(uint32_t chan, const uint8_t *p, size_t n);
void port_kill(uint32_t chan);
bool port_exists(uint32_t chan);
size_t port_poll_count(void);
size_t port_poll_fill(struct pollfd *pfd);
void port_poll_handle(const struct pollfd *pfd);
/* A connection is ready to end without waiting for any fd (the loop must not sleep). */
bool port_pending(void);

#endif
