/* matchlock guest agent: EXEC.
 *
 * Process tree of a sandbox:
 *   agent (PID 1 of the VM) ── sandbox init (PID 1 of the sandbox's PID + mount namespace)
 *                          └─ command of exec A (setsid) ── its children
 *                          └─ command of exec B ...
 * Every exec's command is a child of the agent (which reaps it and reports its status) living
 * in one PID namespace shared by all execs of the sandbox, so a process started in the
 * background by one exec outlives it and is seen by the next (`ps`, its ports, its files).
 * The sandbox init, made at the first EXEC, owns that namespace: orphans re-parent to it and
 * it reaps them; execs cannot see the agent nor signal the init (the kernel drops signals
 * from inside a namespace to its init that has no handler). It also owns the namespace's
 * mounts: its own /proc, and /sys, /proc/sys, /proc/sysrq-trigger read-only. A privileged
 * exec gets a private copy of that mount namespace with those three writable again.
 *
 * An exec is over (EXIT) once its command was reaped and its stdout/stderr reached EOF, or,
 * when a background process still holds them, DRAIN_GRACE_MS after the command exited plus
 * whatever was already written into the pipes then. Later output is read and discarded, so
 * such a process never blocks on (or dies of) a pipe nobody reads.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define MAX_GROUPS 256
#define LINE_BUF 65536 /* longest /etc/passwd or /etc/group line read */
#define NOFILE_HARD (1u << 20)
/* How long an exec's EXIT waits, after its command exited, for a background process that
 * still holds its stdout/stderr. Output already in the pipes is always delivered. */
#define DRAIN_GRACE_MS 500
/* Process pipes hold this much (the kernel's default is 64 KiB): a producer runs on while the
 * agent holds its output back or the port is busy, and one read can fill a frame. */
#define PIPE_BYTES (1 << 20)
/* Coalescing of small writes: a read that got less than it asked for emptied the pipe (or
 * PTY). Two such reads in a row mean a program writing in small pieces: that fd is then not
 * read again for OUTPUT_HOLD_US, so what it writes meanwhile goes out as one frame instead of
 * a frame (and a port write, and a host wake-up) per write. The first output after a quiet
 * spell is never held, a hang-up (every writer closed: the command ended) ends the hold at
 * once, and a full read (or the short tail of a big write, after a full one) never starts
 * one: bulk output is not slowed and interactive output waits at most this long. */
#define OUTPUT_HOLD_US 1000
/* Output frames are 64 KiB with their header: the port takes at most 32 KiB per write (one
 * virtio buffer), so a lone frame of 64 KiB + 12 bytes cost three port writes, this two. */
#define OUTPUT_READ_MAX (MAX_DATA - HDR_SIZE)
/* A spliced frame (pipes, not a PTY) carries a full MAX_DATA: its header is a port write of
 * its own and its payload goes as the pipe's pages, 16 of them, with no 32 KiB limit. */
#define OUTPUT_SPLICE_MAX MAX_DATA
/* A PTY master returns at most this much per read (the line discipline's buffer). */
#define PTY_READ_MAX 4096

struct exec_req {
    char **argv;
    char **envp; /* one spare slot for HOME */
    size_t envc;
    char *cwd, *user;
    uint32_t flags;
    uint16_t rows, cols;
    char *arena; /* all strings, NUL-terminated */
};

struct exec {
    struct exec *next;
    uint32_t chan;
    pid_t pid; /* the command, in the agent's PID namespace */
    bool tty;
    /* Agent ends, -1 once closed. In TTY mode out_fd and in_fd are duplicates of the PTY
     * master (err_fd is unused) and pty holds the master itself until the exec is over:
     * closing the last master reference hangs the terminal up, and a command that closed
     * its stdio just before exiting would die of that SIGHUP. */
    int out_fd, err_fd, in_fd, pty;
    int pfd_out, pfd_err, pfd_in; /* slots in this round's poll set, or -1 */
    /* STDIN bytes not yet written (and so not yet acknowledged): in_buf[in_off, in_off+in_len) */
    uint8_t *in_buf;
    size_t in_off, in_len, in_cap;
    bool in_eof;      /* the host sent EOF: close stdin (send VEOF on a PTY) once drained */
    uint8_t last_in;  /* last byte written to the PTY */
    uint8_t veof[2];  /* VEOF characters still to write to the PTY */
    size_t veof_len;
    size_t out_unacked; /* output credit in use (see OUTPUT_WINDOW) */
    uint64_t hold_out, hold_err; /* CLOCK_MONOTONIC us: that fd is not read before (coalescing) */
    bool short_out, short_err;   /* the last read of that fd emptied it */
    bool reaped;
    int status;        /* the command's wait status, once reaped */
    uint64_t deadline; /* reaped: end of the drain grace (CLOCK_MONOTONIC ms) */
    bool final;        /* grace over: only the bytes owed are still read */
    size_t owed_out, owed_err; /* bytes that were in the pipes when the grace ended */
};

static struct exec *g_execs;

/* The sandbox init and handles on its namespaces (the agent's own PID namespace too, to
 * return to after forking a command into the sandbox's). */
static pid_t g_init = -1;
static int g_pidns = -1, g_mntns = -1, g_own_pidns = -1;

/* Output fds of finished execs still held by background processes: read and discarded until
 * EOF. Each entry may carry a second fd to close with it (a PTY master). */
struct drain {
    int fd, extra;
};
static struct drain *g_drains;
static size_t g_ndrains, g_drain_cap;
static size_t g_drain_pfd, g_drain_polled; /* this round's poll slots: [pfd, pfd + polled) */

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static struct exec *exec_find(uint32_t chan)
{
    for (struct exec *e = g_execs; e; e = e->next)
        if (e->chan == chan) return e;
    return NULL;
}

bool exec_exists(uint32_t chan) { return exec_find(chan) != NULL; }

static void close_fd(int *fd)
{
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* ======================================================================================== */
/* In the exec's processes (after clone). A command runs on the agent's memory until its     */
/* execve: no malloc or stdio (whose state is the agent's), only _exit.                      */
/* ======================================================================================== */

/* Report an error before execve the way a shell would: one line on stderr, exit code. */
static __attribute__((noreturn, format(printf, 2, 3))) void die(int code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg - 1, fmt, ap);
    va_end(ap);
    size_t len = n < 0 ? 0 : (size_t)n > sizeof msg - 2 ? sizeof msg - 2 : (size_t)n;
    msg[len++] = '\n';
    ssize_t w = write(2, msg, len);
    (void)w;
    _exit(code);
}

/* Leave exactly fds 0-2 (the command's stdio) and 3 (extra, close-on-exec). The child holds
 * copies of all the agent's fds; another exec's stdin pipe kept open here would never reach
 * EOF. */
static int arrange_fds(const int stdio[3], int status)
{
    int src[4] = {stdio[0], stdio[1], stdio[2], status};
    /* A source below 4 could be clobbered by a dup2 below: move the sources up first. The
     * agent's own fds are all above 3 in practice, so this is the exception. */
    if (src[0] < 4 || src[1] < 4 || src[2] < 4 || src[3] < 4)
        for (int i = 0; i < 4; i++)
            if ((src[i] = fcntl(src[i], F_DUPFD, 4)) < 0) return -1;
    for (int i = 0; i < 3; i++)
        if (dup2(src[i], i) < 0) return -1;
    if (dup3(src[3], 3, O_CLOEXEC) < 0) return -1;
    if (syscall(SYS_close_range, 4u, ~0u, 0u) < 0) {
        struct rlimit rl;
        int max = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 65536 ? (int)rl.rlim_cur
                                                                             : 65536;
        for (int fd = 4; fd < max; fd++) close(fd);
    }
    return 0;
}

/* ---- user resolution from the guest's /etc/passwd and /etc/group -------------------------- */

struct user {
    uid_t uid;
    gid_t gid;
    bool named; /* found in /etc/passwd */
    char name[256];
    char home[1024];
    gid_t groups[MAX_GROUPS];
    int ngroups;
};

/* A decimal id; -1 (4294967295) is not a valid id. */
static bool parse_id(const char *s, uint32_t *out)
{
    uint64_t v = 0;
    if (!*s || strlen(s) > 10) return false;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return false;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    if (v >= 0xFFFFFFFFu) return false;
    *out = (uint32_t)v;
    return true;
}

/* Split a passwd/group line at ':' into at most max fields; returns the field count. */
static size_t split_fields(char *line, char **field, size_t max)
{
    size_t n = 0;
    field[n++] = line;
    for (char *c = line; *c && n < max; c++)
        if (*c == ':') {
            *c = 0;
            field[n++] = c + 1;
        }
    return n;
}

/* Call fn(line, ctx) for each line of path until it returns true; whether one did. Plain
 * read(2) into a buffer on the stack: this runs in the command's process before its execve,
 * on the agent's memory (see spawn_into_sandbox), where stdio's malloc has no business (and
 * costs page faults). A line longer than the buffer is skipped; a path that is not a regular
 * file (a FIFO would block the open) reads as empty. */
static bool scan_lines(const char *path, bool (*fn)(char *line, void *ctx), void *ctx)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) return false;
    struct stat st;
    bool done = false, skip = false;
    char buf[LINE_BUF];
    size_t len = 0;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) goto out;
    for (;;) {
        ssize_t n = read(fd, buf + len, sizeof buf - 1 - len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { /* the end (or an error): a last line without its newline */
            buf[len] = 0;
            if (len && !skip) done = fn(buf, ctx);
            break;
        }
        len += (size_t)n;
        char *start = buf, *nl;
        while (!done && (nl = memchr(start, '\n', len - (size_t)(start - buf)))) {
            *nl = 0;
            if (!skip) done = fn(start, ctx);
            skip = false;
            start = nl + 1;
        }
        if (done) break;
        len -= (size_t)(start - buf);
        memmove(buf, start, len);
        if (len == sizeof buf - 1) { /* no newline in a whole buffer: drop that line */
            skip = true;
            len = 0;
        }
    }
out:
    close(fd);
    return done;
}

struct passwd_query {
    const char *name; /* or NULL: by uid */
    uint32_t uid;
    struct user *u;
};

static bool passwd_line(char *line, void *ctx)
{
    struct passwd_query *q = ctx;
    char *fld[7];
    uint32_t id, gid;
    if (split_fields(line, fld, 7) < 7 || !parse_id(fld[2], &id) || !parse_id(fld[3], &gid))
        return false;
    if (q->name ? strcmp(fld[0], q->name) != 0 : id != q->uid) return false;
    q->u->uid = id;
    q->u->gid = gid;
    q->u->named = true;
    snprintf(q->u->name, sizeof q->u->name, "%s", fld[0]);
    snprintf(q->u->home, sizeof q->u->home, "%s", fld[5]);
    return true;
}

/* Find a passwd entry by name, or by uid when name is NULL. */
static bool passwd_lookup(const char *name, uint32_t uid, struct user *u)
{
    struct passwd_query q = {name, uid, u};
    return scan_lines("/etc/passwd", passwd_line, &q);
}

struct group_query {
    const char *name; /* a group to find, into gid; or NULL: u->name's groups, into u */
    gid_t *gid;
    struct user *u;
};

static bool group_line(char *line, void *ctx)
{
    struct group_query *q = ctx;
    char *fld[4];
    uint32_t gid;
    if (split_fields(line, fld, 4) < 4 || !parse_id(fld[2], &gid)) return false;
    if (q->name) {
        if (strcmp(fld[0], q->name) != 0) return false;
        *q->gid = gid;
        return true;
    }
    struct user *u = q->u;
    size_t want = strlen(u->name);
    for (char *m = fld[3], *end; *m; m = *end ? end + 1 : end) { /* members, comma-separated */
        end = strchrnul(m, ',');
        if (!want || (size_t)(end - m) != want || memcmp(m, u->name, want) != 0) continue;
        bool dup = false;
        for (int i = 0; i < u->ngroups; i++) dup |= u->groups[i] == gid;
        if (!dup && u->ngroups < MAX_GROUPS) u->groups[u->ngroups++] = gid;
    }
    return false;
}

/* With group_name: find its gid. Otherwise: add every group that lists u->name as member. */
static bool group_scan(const char *group_name, gid_t *gid_out, struct user *u)
{
    struct group_query q = {group_name, gid_out, u};
    return scan_lines("/etc/group", group_line, &q);
}

/* USER is `uid`, `uid:gid`, `name` or `name:group` (absent: root). A numeric uid missing from
 * /etc/passwd gets gid = uid and no supplementary groups. */
static void resolve_user(const char *spec, struct user *u)
{
    char buf[512];
    if (snprintf(buf, sizeof buf, "%s", spec ? spec : "0") >= (int)sizeof buf)
        die(126, "matchlock: user \"%.64s...\": name too long", buf);
    char *group = strchr(buf, ':');
    if (group) *group++ = 0;
    uint32_t id;
    memset(u, 0, sizeof *u);
    if (parse_id(buf, &id)) {
        if (!passwd_lookup(NULL, id, u)) u->uid = u->gid = id;
    } else if (!passwd_lookup(buf, 0, u)) {
        die(126, "matchlock: user \"%s\": not found in /etc/passwd", buf);
    }
    if (group) {
        if (parse_id(group, &id)) u->gid = id;
        else if (!group_scan(group, &u->gid, NULL))
            die(126, "matchlock: group \"%s\": not found in /etc/group", group);
    }
    u->groups[0] = u->gid;
    u->ngroups = 1;
    if (u->named) group_scan(NULL, NULL, u);
}

/* ---- hardening ---------------------------------------------------------------------------- */

/* musl ships no <linux/filter.h>, <linux/seccomp.h>, <linux/audit.h>: the stable ABI values. */
struct sock_filter {
    uint16_t code;
    uint8_t jt, jf;
    uint32_t k;
};
struct sock_fprog {
    unsigned short len;
    const struct sock_filter *filter;
};
#define BPF_LD_W_ABS 0x20 /* BPF_LD | BPF_W | BPF_ABS */
#define BPF_JEQ_K 0x15    /* BPF_JMP | BPF_JEQ | BPF_K */
#define BPF_JGE_K 0x35    /* BPF_JMP | BPF_JGE | BPF_K */
#define BPF_RET_K 0x06    /* BPF_RET | BPF_K */
#define SECCOMP_MODE_FILTER 2
#define SECCOMP_RET_KILL_PROCESS 0x80000000u
#define SECCOMP_RET_ERRNO 0x00050000u
#define SECCOMP_RET_ALLOW 0x7fff0000u
#define AUDIT_ARCH_X86_64 0xc000003eu
#define AUDIT_ARCH_I386 0x40000003u
#define X32_SYSCALL_BIT 0x40000000u
#define DATA_NR 0   /* offsetof(struct seccomp_data, nr) */
#define DATA_ARCH 4 /* offsetof(struct seccomp_data, arch) */

/* Instruction `at` of the program: jump to absolute indexes t / f (BPF wants relative). */
#define LD(off) {BPF_LD_W_ABS, 0, 0, off}
#define JEQ(at, k, t, f) {BPF_JEQ_K, (uint8_t)((t) - (at) - 1), (uint8_t)((f) - (at) - 1), k}
#define JGE(at, k, t, f) {BPF_JGE_K, (uint8_t)((t) - (at) - 1), (uint8_t)((f) - (at) - 1), k}
#define RET(k) {BPF_RET_K, 0, 0, k}

enum { L_I386 = 10, L_KILL = 17, L_EPERM = 18, L_ENOSYS = 19 };

/* Fail ptrace, process_vm_readv/writev, kexec_load, kexec_file_load with EPERM, for native
 * calls and for the i386 entry points (which have their own numbers and would bypass a
 * native-only list); x32 calls (same arch, high bit) are refused outright. */
static const struct sock_filter seccomp_filter[] = {
    /* 0 */ LD(DATA_ARCH),
    /* 1 */ JEQ(1, AUDIT_ARCH_X86_64, 2, L_I386),
    /* 2 */ LD(DATA_NR),
    /* 3 */ JGE(3, X32_SYSCALL_BIT, L_ENOSYS, 4),
    /* 4 */ JEQ(4, 101, L_EPERM, 5), /* ptrace */
    /* 5 */ JEQ(5, 310, L_EPERM, 6), /* process_vm_readv */
    /* 6 */ JEQ(6, 311, L_EPERM, 7), /* process_vm_writev */
    /* 7 */ JEQ(7, 246, L_EPERM, 8), /* kexec_load */
    /* 8 */ JEQ(8, 320, L_EPERM, 9), /* kexec_file_load */
    /* 9 */ RET(SECCOMP_RET_ALLOW),
    /* 10 L_I386 */ JEQ(10, AUDIT_ARCH_I386, 11, L_KILL),
    /* 11 */ LD(DATA_NR),
    /* 12 */ JEQ(12, 26, L_EPERM, 13),  /* ptrace */
    /* 13 */ JEQ(13, 347, L_EPERM, 14), /* process_vm_readv */
    /* 14 */ JEQ(14, 348, L_EPERM, 15), /* process_vm_writev */
    /* 15 */ JEQ(15, 283, L_EPERM, 16), /* kexec_load */
    /* 16 */ RET(SECCOMP_RET_ALLOW),
    /* 17 L_KILL */ RET(SECCOMP_RET_KILL_PROCESS),
    /* 18 L_EPERM */ RET(SECCOMP_RET_ERRNO | EPERM),
    /* 19 L_ENOSYS */ RET(SECCOMP_RET_ERRNO | ENOSYS),
};

/* What root in a default exec gives up. The VM is the sandbox: root keeps what installing and
 * running software needs (chown, dac_override, fowner, fsetid, setuid/setgid, setpcap,
 * setfcap, kill, net_bind_service, sys_chroot; mknod too, as devtmpfs already holds every
 * device node). It loses what reaches past the guest kernel or changes what the host set up:
 *   SYS_ADMIN, SYS_MODULE, SYS_RAWIO, SYS_BOOT, SYS_PTRACE: mounts, kernel code, device memory
 *     and ports, reboot, other processes' memory (the exec's own init has every capability);
 *   NET_ADMIN, NET_RAW: eth0's address, routes, MTU and neighbours, and forged packets (raw and
 *     packet sockets). The host's firewall does not depend on it; the wiring is still the
 *     host's to decide;
 *   SYS_TIME: the clock is the host's too (set at SETUP);
 *   SYS_NICE, SYS_RESOURCE: a real-time policy (directly, or by raising RLIMIT_RTPRIO) is not
 *     subject to the CFS quota of a fractional --cpus;
 *   PERFMON, BPF: kernel attack surface; the guest kernel builds neither today, and root
 *     should not gain them unasked if it ever does. */
static const int dropped_caps[] = {21, 16, 17, 22, 19, 12, 13, 25, 23, 24, 38, 39};

/* Header and data of capget/capset (<linux/capability.h>, version 3: two 32-bit words). */
struct cap_header {
    uint32_t version;
    int pid;
};
struct cap_data {
    uint32_t effective, permitted, inheritable;
};

/* Out of the bounding set, execve cannot give a capability back, even to root; out of the
 * inheritable set too (and so the ambient set), or root's execve would restore it from there. */
static void drop_caps(void)
{
    struct cap_header h = {0x20080522, 0};
    struct cap_data d[2];
    if (syscall(SYS_capget, &h, d)) die(126, "matchlock: capget: %s", strerror(errno));
    for (size_t i = 0; i < sizeof dropped_caps / sizeof *dropped_caps; i++) {
        int cap = dropped_caps[i];
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) && errno != EINVAL)
            die(126, "matchlock: drop capability %d: %s", cap, strerror(errno));
        uint32_t keep = ~(1u << (cap % 32));
        d[cap / 32].effective &= keep;
        d[cap / 32].permitted &= keep;
        d[cap / 32].inheritable &= keep;
    }
    if (syscall(SYS_capset, &h, d)) die(126, "matchlock: capset: %s", strerror(errno));
}

/* struct mount_attr of mount_setattr(2) (<linux/mount.h>, which musl does not ship). */
struct mount_attr {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};
#define MOUNT_ATTR_RDONLY 0x1u

/* Kernel settings root can change with no capability at all, by writing a file: in /sys
 * (unbind a virtio driver: the NIC, a disk, the control port), in /proc/sys (net.ipv4.*
 * reconfigures the network, ping_group_range hands out ICMP sockets without CAP_NET_RAW,
 * kernel.hostname skips CAP_SYS_ADMIN; with core dumps built in, kernel.core_pattern "|prog"
 * would run prog with every capability), and /proc/sysrq-trigger (reboot, or kill every
 * process of every exec). Read-only in this exec's mount namespace only (PID 1 and privileged
 * execs keep them writable); without CAP_SYS_ADMIN the command cannot remount or unmount
 * them. Recursive, so /sys/fs/cgroup and whatever gets mounted below later are covered. */
static const char *const kernel_files[] = {"/sys", "/proc/sys", "/proc/sysrq-trigger"};
#define N_KERNEL_FILES (sizeof kernel_files / sizeof *kernel_files)

/* Returns NULL, or the path that failed (errno set). */
static const char *protect_kernel_files(void)
{
    struct mount_attr ro = {.attr_set = MOUNT_ATTR_RDONLY};
    for (size_t i = 0; i < N_KERNEL_FILES; i++) {
        const char *p = kernel_files[i];
        if (mount(p, p, NULL, MS_BIND | MS_REC, NULL)) {
            if (errno == ENOENT) continue; /* nothing there to protect */
            return p;
        }
        if (syscall(SYS_mount_setattr, AT_FDCWD, p, AT_RECURSIVE, &ro, sizeof ro)) return p;
    }
    return NULL;
}

/* A privileged exec, in its own copy of the sandbox's mount namespace: drop the read-only
 * binds (innermost first), which uncovers the writable originals beneath. */
static void unprotect_kernel_files(void)
{
    for (size_t i = N_KERNEL_FILES; i-- > 0;) {
        const char *p = kernel_files[i];
        if (umount2(p, MNT_DETACH) && errno != ENOENT && errno != EINVAL)
            die(126, "matchlock: make %s writable: %s", p, strerror(errno));
    }
}

static void install_seccomp(void)
{
    struct sock_fprog prog = {sizeof seccomp_filter / sizeof *seccomp_filter, seccomp_filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        die(126, "matchlock: no_new_privs: %s", strerror(errno));
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0))
        die(126, "matchlock: seccomp: %s", strerror(errno));
}

/* ---- the command ---------------------------------------------------------------------------- */

static const char *env_get(char **envp, const char *key)
{
    size_t kl = strlen(key);
    for (; *envp; envp++)
        if (strncmp(*envp, key, kl) == 0 && (*envp)[kl] == '=') return *envp + kl + 1;
    return NULL;
}

/* execve argv[0], searching the exec's own PATH (not ours) when it has no '/'. Exit codes and
 * messages follow the shells: 127 not found, 126 found but not executable. */
static __attribute__((noreturn)) void exec_command(char **argv, char **envp)
{
    const char *name = argv[0];
    int err = ENOENT;
    if (strchr(name, '/')) {
        execve(name, argv, envp);
        err = errno;
        if (err == ENOENT) die(127, "matchlock: %s: %s", name, strerror(err));
    } else {
        const char *path = env_get(envp, "PATH");
        bool denied = false;
        for (const char *dir = path ? path : DEFAULT_PATH; *name;) {
            const char *end = strchrnul(dir, ':');
            char file[4096];
            int len = (int)(end - dir);
            /* An empty PATH entry means the working directory, as in execvp. A failed execve
             * costs the kernel a new address space and copies of argv and envp: entries
             * where name does not exist are told apart with access first. */
            if (snprintf(file, sizeof file, "%.*s%s%s", len, dir, len ? "/" : "", name) <
                    (int)sizeof file &&
                (access(file, F_OK) == 0 || (errno != ENOENT && errno != ENOTDIR))) {
                execve(file, argv, envp);
                if (errno == EACCES) denied = true;
                else if (errno != ENOENT && errno != ENOTDIR) {
                    err = errno;
                    break;
                }
            }
            if (!*end) break;
            dir = end + 1;
        }
        if (err == ENOENT && denied) err = EACCES;
        if (err == ENOENT) die(127, "matchlock: %s: command not found", name);
    }
    if (err == EACCES) die(126, "matchlock: %s: permission denied", name);
    die(126, "matchlock: %s: %s", name, strerror(err));
}

static __attribute__((noreturn)) void run_command(struct exec_req *r)
{
    /* execve keeps ignored signals ignored and the signal mask (blocked while starting, so
     * that a SIGNAL sent before this point waits instead of being lost): give the command the
     * usual clean slate. Handlers do not survive execve, and the agent has none: only the
     * signals it ignores need resetting. A pending signal hits the command right here. */
    for (size_t i = 0; i < N_IGNORED_SIGNALS; i++) signal(g_ignored_signals[i], SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* The kernel's soft limit back; the hard one up to the kernel's default nr_open, as a
     * default exec's root can no longer raise it itself (no CAP_SYS_RESOURCE). */
    struct rlimit rl;
    if (g_nofile_soft && getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rlim_t hard = rl.rlim_max;
        rl.rlim_cur = (rlim_t)g_nofile_soft;
        if (rl.rlim_max < NOFILE_HARD) rl.rlim_max = NOFILE_HARD;
        if (setrlimit(RLIMIT_NOFILE, &rl)) {
            rl.rlim_max = hard; /* a lower nr_open (--stdio on a host) */
            setrlimit(RLIMIT_NOFILE, &rl);
        }
    }

    bool tty = r->flags & EXEC_FLAG_TTY;
    setsid();
    if (tty && ioctl(0, TIOCSCTTY, 0) < 0)
        die(126, "matchlock: set the controlling terminal: %s", strerror(errno));

    struct user u;
    resolve_user(r->user, &u);
    if (!(r->flags & EXEC_FLAG_PRIVILEGED)) drop_caps();
    if (tty && fchown(0, u.uid, (gid_t)-1) < 0) {
        /* cosmetic (lets the user reopen its own terminal); not worth failing for */
    }
    if (setgroups((size_t)u.ngroups, u.groups) || setgid(u.gid) || setuid(u.uid))
        die(126, "matchlock: switch to user %s: %s", r->user ? r->user : "0", strerror(errno));
    /* Changing uid resets dumpable to fs.suid_dumpable, for the memory we share with the
     * agent until execve: keep it out of reach (see main). */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    const char *cwd = r->cwd ? r->cwd : "/";
    if (chdir("/") || chdir(cwd)) die(126, "matchlock: cwd %s: %s", cwd, strerror(errno));

    char home[1100];
    if (!env_get(r->envp, "HOME")) {
        snprintf(home, sizeof home, "HOME=%s", u.named && *u.home ? u.home : "/");
        r->envp[r->envc] = home;
    }
    if (!(r->flags & EXEC_FLAG_PRIVILEGED)) install_seccomp();
    exec_command(r->argv, r->envp);
}

struct spawn {
    struct exec_req *r;
    const int *stdio; /* the command's fds 0-2 */
    int mntns;        /* the sandbox's mount namespace */
    int released;     /* open (close-on-exec) until the command no longer uses our memory */
};

/* The command's process (spawn_into_sandbox): joins the sandbox's mounts (a privileged exec
 * then takes a private copy of them) and becomes the command. */
static int exec_child(void *arg)
{
    struct spawn *s = arg;
    struct exec_req *r = s->r;
    int ns_err = setns(s->mntns, CLONE_NEWNS) ? errno : 0;
    if (arrange_fds(s->stdio, s->released) < 0) _exit(126);
    if (ns_err) die(126, "matchlock: join the sandbox's mounts: %s", strerror(ns_err));
    if (r->flags & EXEC_FLAG_PRIVILEGED) {
        if (unshare(CLONE_NEWNS))
            die(126, "matchlock: private mounts for a privileged exec: %s", strerror(errno));
        unprotect_kernel_files();
    }
    run_command(r);
}

/* Tell the agent how the init's start went, on fd 3: "R" ready, or an error message. */
static __attribute__((noreturn, format(printf, 1, 2))) void init_fail(const char *fmt, ...)
{
    char msg[300];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ssize_t w = write(3, msg, n < 0 ? 0 : (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
    (void)w;
    _exit(1);
}

/* The sandbox init: PID 1 of the sandbox's namespaces. Sets up the mounts every exec shares,
 * then only reaps orphans until the agent kills it (which kills the whole namespace). */
static __attribute__((noreturn)) void sandbox_init(int ready)
{
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    int keep[3] = {null, null, 2};
    if (null < 0 || arrange_fds(keep, ready) < 0) _exit(1);
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0); /* --stdio: the namespace dies with the agent */
    prctl(PR_SET_NAME, "matchlock-init", 0, 0, 0);
    /* The OOM killer would take every process of the sandbox with it. */
    int oom = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (oom >= 0) {
        ssize_t w = write(oom, "-1000", 5);
        (void)w;
        close(oom);
    }
    /* Private propagation first: on a host with shared mounts (--stdio tests) the unmount and
     * the new /proc would otherwise propagate to the host's namespace. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL))
        init_fail("make the sandbox's mounts private: %s", strerror(errno));
    umount2("/proc", MNT_DETACH);
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
        init_fail("mount /proc for the sandbox: %s", strerror(errno));
    const char *bad = protect_kernel_files();
    if (bad) init_fail("make %s read-only: %s", bad, strerror(errno));
    if (chdir("/")) init_fail("chdir /: %s", strerror(errno));
    ssize_t w = write(3, "R", 1);
    (void)w;
    close(3);

    /* Only SIGCHLD is blocked (and collected): every other signal keeps its default action,
     * which the kernel drops for a namespace init when sent from inside the namespace. */
    for (int s = 1; s < 65; s++)
        if (s != SIGKILL && s != SIGSTOP) signal(s, SIG_DFL);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_SETMASK, &chld, NULL);
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
        sigwaitinfo(&chld, NULL);
    }
}

/* ======================================================================================== */
/* In the agent.                                                                             */
/* ======================================================================================== */

static void req_free(struct exec_req *r)
{
    free(r->argv);
    free(r->envp);
    free(r->arena);
}

/* Validate the EXEC TLV and copy its strings; on error a reason is left in why. */
static int parse_exec(const uint8_t *p, size_t n, struct exec_req *r, char *why, size_t wsz)
{
    memset(r, 0, sizeof *r);
    r->rows = 24;
    r->cols = 80;
    struct tlv t = {p, n, 0};
    struct tlv_field f;
    size_t argc = 0, envc = 0, bytes = 0;
    int rc;
    while ((rc = tlv_next(&t, &f)) > 0) {
        switch (f.tag) {
        case EXEC_ENV:
            if (!f.len || f.val[0] == '=' || !memchr(f.val, '=', f.len)) {
                snprintf(why, wsz, "bad EXEC request: ENV entry is not KEY=VALUE");
                return -1;
            }
            /* fall through */
        case EXEC_ARG:
        case EXEC_CWD:
        case EXEC_USER:
            if (memchr(f.val, 0, f.len)) {
                snprintf(why, wsz, "bad EXEC request: field %u contains a NUL byte", f.tag);
                return -1;
            }
            argc += f.tag == EXEC_ARG;
            envc += f.tag == EXEC_ENV;
            bytes += f.len + 1;
            break;
        case EXEC_FLAGS:
        case EXEC_ROWS:
        case EXEC_COLS:
            if (f.len != (f.tag == EXEC_FLAGS ? 4u : 2u)) {
                snprintf(why, wsz, "bad EXEC request: field %u has the wrong size", f.tag);
                return -1;
            }
            if (f.tag == EXEC_FLAGS) r->flags = get_be32(f.val);
            else if (f.tag == EXEC_ROWS) r->rows = get_be16(f.val);
            else r->cols = get_be16(f.val);
            break;
        default: break; /* unknown tags: forward compatibility */
        }
    }
    if (rc < 0 || argc == 0) {
        snprintf(why, wsz, "bad EXEC request: %s", rc < 0 ? "malformed TLV" : "no ARG");
        return -1;
    }
    r->argv = calloc(argc + 1, sizeof *r->argv);
    r->envp = calloc(envc + 2, sizeof *r->envp);
    r->arena = malloc(bytes);
    if (!r->argv || !r->envp || !r->arena) {
        req_free(r);
        snprintf(why, wsz, "EXEC request: out of memory");
        return -1;
    }
    char *a = r->arena;
    size_t ai = 0;
    t.off = 0;
    while (tlv_next(&t, &f) > 0) {
        if (f.tag < EXEC_ARG || f.tag > EXEC_USER) continue;
        memcpy(a, f.val, f.len);
        a[f.len] = 0;
        if (f.tag == EXEC_ARG) r->argv[ai++] = a;
        else if (f.tag == EXEC_ENV) r->envp[r->envc++] = a;
        else if (f.tag == EXEC_CWD) r->cwd = a;
        else r->user = a;
        a += f.len + 1;
    }
    return 0;
}

/* The exec could not even be started: say why on its stderr and end the channel. */
static void exec_refuse(uint32_t chan, const char *why)
{
    agent_log("channel %u: %s", chan, why);
    char line[300];
    int n = snprintf(line, sizeof line, "matchlock: %s\n", why);
    size_t len = n < 0 ? 0 : (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
    if (len) send_frame(F_STDERR, chan, line, len, NULL, 0);
    uint8_t ex[8];
    put_be32(ex, 126);
    put_be32(ex + 4, 0);
    send_frame(F_EXIT, chan, ex, 8, NULL, 0);
}

/* Create the command's stdio. child[] receives the ends for the command (possibly the same
 * fd three times), e's fds the agent's ends. */
static int open_stdio(struct exec *e, const struct exec_req *r, int child[3])
{
    if (e->tty) {
        int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (m < 0) return -1;
        e->pty = m;
        if (unlockpt(m)) return -1;
        int s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (s < 0) return -1;
        child[0] = child[1] = child[2] = s;
        struct winsize ws = {.ws_row = r->rows ? r->rows : 24, .ws_col = r->cols ? r->cols : 80};
        ioctl(m, TIOCSWINSZ, &ws);
        set_nonblock(m);
        if ((e->out_fd = fcntl(m, F_DUPFD_CLOEXEC, 0)) < 0) return -1;
        if ((e->in_fd = fcntl(m, F_DUPFD_CLOEXEC, 0)) < 0) return -1;
        return 0;
    }
    int po[2], pe[2], pi[2];
    if (pipe2(po, O_CLOEXEC)) return -1;
    e->out_fd = po[0];
    child[1] = po[1];
    if (pipe2(pe, O_CLOEXEC)) return -1;
    e->err_fd = pe[0];
    child[2] = pe[1];
    if (r->flags & EXEC_FLAG_STDIN) {
        if (pipe2(pi, O_CLOEXEC)) return -1;
        child[0] = pi[0];
        e->in_fd = pi[1];
        set_nonblock(e->in_fd);
    } else if ((child[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
        return -1;
    }
    /* Larger pipes are an optimisation: a failure leaves the default size. */
    fcntl(e->out_fd, F_SETPIPE_SZ, PIPE_BYTES);
    fcntl(e->err_fd, F_SETPIPE_SZ, PIPE_BYTES);
    set_nonblock(e->out_fd);
    set_nonblock(e->err_fd);
    return 0;
}

static void close_child_ends(int child[3])
{
    for (int i = 0; i < 3; i++) {
        if (child[i] < 0) continue;
        int fd = child[i];
        close(fd);
        for (int j = i; j < 3; j++)
            if (child[j] == fd) child[j] = -1;
    }
}

static void exec_free(struct exec *e)
{
    close_fd(&e->out_fd);
    close_fd(&e->err_fd);
    close_fd(&e->in_fd);
    close_fd(&e->pty);
    free(e->in_buf);
    free(e);
}

static void sandbox_forget(void)
{
    g_init = -1;
    close_fd(&g_pidns);
    close_fd(&g_mntns);
}

/* The first EXEC starts the sandbox init, unless PREPARE did (an image template holds it,
 * so its clones do not pay for it); a generic template has no such process. */
int sandbox_ensure(char *why, size_t wsz)
{
    if (g_init > 0) return 0;
    if (g_own_pidns < 0 && (g_own_pidns = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC)) < 0) {
        snprintf(why, wsz, "cannot start the sandbox: /proc/self/ns/pid: %s", strerror(errno));
        return -1;
    }
    int ready[2];
    if (pipe2(ready, O_CLOEXEC)) {
        snprintf(why, wsz, "cannot start the sandbox: pipe: %s", strerror(errno));
        return -1;
    }
    long pid = syscall(SYS_clone, CLONE_NEWPID | CLONE_NEWNS | SIGCHLD, NULL, NULL, NULL, NULL);
    if (pid == 0) sandbox_init(ready[1]);
    int err = errno;
    close(ready[1]);
    if (pid < 0) {
        close(ready[0]);
        snprintf(why, wsz, "cannot start the sandbox: %s", strerror(err));
        return -1;
    }
    g_init = (pid_t)pid;
    /* Blocking, once: the init only makes a few mounts before it answers (or exits). */
    char msg[300];
    size_t got = 0;
    ssize_t n;
    while (got < sizeof msg - 1 &&
           ((n = read(ready[0], msg + got, sizeof msg - 1 - got)) > 0 || (n < 0 && errno == EINTR)))
        if (n > 0) got += (size_t)n;
    close(ready[0]);
    msg[got] = 0;
    char path[64];
    if (got == 1 && msg[0] == 'R') {
        snprintf(path, sizeof path, "/proc/%ld/ns/pid", pid);
        g_pidns = open(path, O_RDONLY | O_CLOEXEC);
        snprintf(path, sizeof path, "/proc/%ld/ns/mnt", pid);
        g_mntns = open(path, O_RDONLY | O_CLOEXEC);
        if (g_pidns >= 0 && g_mntns >= 0) return 0;
        snprintf(msg, sizeof msg, "%s: %s", path, strerror(errno));
    }
    snprintf(why, wsz, "cannot start the sandbox: %.150s", got ? msg : "its init died");
    kill(g_init, SIGKILL); /* reaped by exec_reap */
    sandbox_forget();
    return -1;
}

void sandbox_drop(void)
{
    if (g_init > 0) kill(g_init, SIGKILL); /* reaped by exec_reap */
    sandbox_forget();
}

/* A command's process runs on the agent's memory until its execve (spawn_into_sandbox): on
 * this stack, and for at most this long. */
#define CHILD_STACK (256u << 10)
#define GUARD 4096u
#define SPAWN_TIMEOUT_MS 10000
static char *g_child_stack; /* its top; NULL until the first exec */

/* Wait until fd (the read end of a pipe whose only writer is the starting command) reports
 * the hang-up: the command's execve replaced its memory, or it ended. */
static bool wait_released(int fd, int timeout_ms)
{
    uint64_t end = now_ms() + (uint64_t)timeout_ms;
    for (;;) {
        uint64_t now = now_ms();
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int n = poll(&p, 1, now >= end ? 0 : (int)(end - now));
        if (n == 0) return false;
        if (n > 0 && (p.revents & (POLLHUP | POLLERR))) return true;
        if (n > 0) { /* nothing writes to it; read whatever it is and go on waiting */
            char c[64];
            if (read(fd, c, sizeof c) == 0) return true;
        }
    }
}

/* Start a command in the sandbox's PID namespace (setns changes where the agent's next
 * children go, so it points back at the agent's own namespace right after).
 *
 * The child shares the agent's memory (CLONE_VM) and runs on a stack of its own until its
 * execve: under emulation, copying the agent's page tables for a fork, the copy-on-write
 * faults on both sides, and tearing the copy down again at execve cost more than everything
 * else an exec does. The agent waits meanwhile (its memory must not change under the child),
 * like vfork, but only for SPAWN_TIMEOUT_MS: a command stopped before its execve (SIGSTOP
 * from inside the sandbox) is killed then rather than stopping the agent. Returns the pid, or
 * -1 with errno set. */
static long spawn_into_sandbox(struct spawn *s)
{
    if (!g_child_stack) {
        /* One stack for every command, kept: its pages are faulted in once. A guard page
         * below it turns an overflow into a fault instead of a write into the agent. */
        char *m = mmap(NULL, CHILD_STACK + GUARD, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (m == MAP_FAILED) return -1;
        if (mprotect(m, GUARD, PROT_NONE)) {
            int err = errno;
            munmap(m, CHILD_STACK + GUARD);
            errno = err;
            return -1;
        }
        g_child_stack = m + GUARD + CHILD_STACK;
    }
    int rel[2];
    if (pipe2(rel, O_CLOEXEC)) return -1;
    s->released = rel[1];
    if (setns(g_pidns, CLONE_NEWPID)) {
        int err = errno;
        close(rel[0]);
        close(rel[1]);
        errno = err;
        return -1;
    }
    long pid = clone(exec_child, g_child_stack, CLONE_VM | SIGCHLD, s);
    int err = errno;
    close(rel[1]);
    if (setns(g_own_pidns, CLONE_NEWPID)) {
        /* Cannot happen (our own namespace is always a valid target); if it did, later
         * children would land in the sandbox: say so loudly. */
        agent_log("cannot return to the agent's PID namespace: %s", strerror(errno));
    }
    if (pid > 0 && !wait_released(rel[0], SPAWN_TIMEOUT_MS)) {
        agent_log("process %ld did not start within %d s; killing it", pid,
                  SPAWN_TIMEOUT_MS / 1000);
        kill((pid_t)pid, SIGKILL);
        /* Dead, it no longer runs code of ours; one still inside a system call may yet
         * write to its stack, which is then left to it. */
        if (!wait_released(rel[0], 1000)) g_child_stack = NULL;
    }
    close(rel[0]);
    errno = err;
    return pid;
}

/* PREPARE's warm-up command, for an image template: run once as root (unprivileged, like a
 * default exec: capabilities dropped, seccomp) with only PATH and HOME, stdio on /dev/null,
 * for at most timeout_ms. What it reads stays in the page cache and what it writes in the
 * writable layer of every clone; no process of it does: the sandbox init is then ended (the
 * kernel kills everything in its PID namespace with it) and a fresh one started. A command
 * that does not exist or fails changes nothing else. */
int sandbox_warm(char **argv, int timeout_ms, char *why, size_t wsz)
{
    static char path_env[] = "PATH=" DEFAULT_PATH;
    char *envp[3] = {path_env, NULL, NULL}; /* a spare slot for HOME (run_command) */
    struct exec_req r = {.argv = argv, .envp = envp, .envc = 1};
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        int stdio[3] = {null, null, null};
        sigset_t all, old;
        sigfillset(&all);
        sigprocmask(SIG_BLOCK, &all, &old);
        struct spawn s = {.r = &r, .stdio = stdio, .mntns = g_mntns};
        long pid = spawn_into_sandbox(&s);
        sigprocmask(SIG_SETMASK, &old, NULL);
        close(null);
        uint64_t end = now_ms() + (uint64_t)timeout_ms;
        while (pid > 0 && waitpid((pid_t)pid, NULL, WNOHANG) == 0) {
            if (now_ms() >= end) {
                agent_log("the warm-up command did not end within %d ms; killing it", timeout_ms);
                kill((pid_t)pid, SIGKILL);
                waitpid((pid_t)pid, NULL, 0);
                break;
            }
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    pid_t init = g_init;
    sandbox_drop();
    if (init > 0) waitpid(init, NULL, 0); /* its namespace is empty once it is reaped */
    return sandbox_ensure(why, wsz);
}

void exec_start(uint32_t chan, const uint8_t *p, size_t n)
{
    if (channel_busy(chan)) {
        agent_log("ignoring EXEC on channel %u, which is in use", chan);
        return;
    }
    struct exec_req r;
    char why[200];
    if (parse_exec(p, n, &r, why, sizeof why) < 0) {
        exec_refuse(chan, why);
        return;
    }
    if (sandbox_ensure(why, sizeof why) < 0) {
        req_free(&r);
        exec_refuse(chan, why);
        return;
    }
    struct exec *e = calloc(1, sizeof *e);
    int child[3] = {-1, -1, -1};
    if (!e) {
        req_free(&r);
        exec_refuse(chan, "cannot start the process: out of memory");
        return;
    }
    e->chan = chan;
    e->tty = r.flags & EXEC_FLAG_TTY;
    e->out_fd = e->err_fd = e->in_fd = e->pty = -1;
    e->pfd_out = e->pfd_err = e->pfd_in = -1;
    if (open_stdio(e, &r, child) < 0) {
        snprintf(why, sizeof why, "cannot create the process's stdio: %s", strerror(errno));
        goto refuse;
    }

    /* The child starts with every signal blocked, so a SIGNAL arriving before it is ready
     * waits for it instead of being dropped (see run_command). */
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    struct spawn s = {.r = &r, .stdio = child, .mntns = g_mntns};
    long pid = spawn_into_sandbox(&s);
    int clone_err = errno;
    sigprocmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        snprintf(why, sizeof why, "cannot start the process: %s", strerror(clone_err));
        goto refuse;
    }
    close_child_ends(child);
    req_free(&r);
    e->pid = (pid_t)pid;
    e->next = g_execs;
    g_execs = e;
    uint8_t b[4];
    put_be32(b, (uint32_t)pid);
    send_frame(F_STARTED, chan, b, 4, NULL, 0);
    return;

refuse:
    close_child_ends(child);
    exec_free(e);
    req_free(&r);
    exec_refuse(chan, why);
}

/* ---- stdin ------------------------------------------------------------------------------ */

static void send_ack(uint32_t chan, size_t n)
{
    uint8_t b[4];
    put_be32(b, (uint32_t)n);
    send_frame(F_STDIN_ACK, chan, b, 4, NULL, 0);
}

/* Write buffered stdin without blocking; acknowledge what was written, or dropped because the
 * process stopped reading (EPIPE, or EIO once a PTY has no slave left). */
static void exec_write_stdin(struct exec *e)
{
    size_t done = 0;
    while (e->in_len && e->in_fd >= 0) {
        ssize_t n = write(e->in_fd, e->in_buf + e->in_off, e->in_len);
        if (n > 0) {
            e->last_in = e->in_buf[e->in_off + (size_t)n - 1];
            e->in_off += (size_t)n;
            e->in_len -= (size_t)n;
            done += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            break;
        } else {
            done += e->in_len;
            e->in_len = 0;
            close_fd(&e->in_fd);
        }
    }
    if (!e->in_len) e->in_off = 0;
    if (done) send_ack(e->chan, done);
    if (!e->in_eof || e->in_len || e->in_fd < 0) return;
    while (e->veof_len) { /* a PTY: EOF is the VEOF character, not a close */
        ssize_t n = write(e->in_fd, e->veof + (sizeof e->veof - e->veof_len), e->veof_len);
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0 && errno != EINTR) break;
        if (n > 0) e->veof_len -= (size_t)n;
    }
    close_fd(&e->in_fd);
}

/* A host bug: stop the exec rather than buffer without bound. */
static void exec_abort(struct exec *e, const char *why)
{
    agent_log("channel %u: %s; killing the exec", e->chan, why);
    e->in_eof = true;
    e->in_len = 0;
    close_fd(&e->in_fd);
    exec_kill(e->chan);
}

void exec_stdin(uint32_t chan, const uint8_t *p, size_t n)
{
    struct exec *e = exec_find(chan);
    if (!e) return;
    if (n == 0) {
        if (e->in_eof) return;
        e->in_eof = true;
        if (e->tty && e->in_fd >= 0) {
            /* One VEOF ends input on an empty line; after a partial line the first one only
             * delivers that line, so send a second, as a user at a terminal would. */
            struct termios tio;
            uint8_t c = tcgetattr(e->in_fd, &tio) == 0 && tio.c_cc[VEOF] ? tio.c_cc[VEOF] : 4;
            uint8_t last = e->in_len ? e->in_buf[e->in_off + e->in_len - 1] : e->last_in;
            bool partial = last && last != '\n' && last != '\r' && last != c;
            e->veof[0] = e->veof[1] = c;
            e->veof_len = partial ? 2 : 1;
        }
        exec_write_stdin(e);
        return;
    }
    if (e->in_eof || e->in_fd < 0) { /* nowhere to go: consumed as dropped */
        send_ack(chan, n);
        return;
    }
    if (n > MAX_DATA || e->in_len + n > STDIN_WINDOW) {
        char why[120];
        snprintf(why, sizeof why, "STDIN of %zu bytes with %zu unacknowledged exceeds the window",
                 n, e->in_len);
        exec_abort(e, why);
        return;
    }
    if (!e->in_len) { /* nothing queued before it: write straight from the frame, no copy */
        ssize_t w;
        do w = write(e->in_fd, p, n);
        while (w < 0 && errno == EINTR);
        if (w < 0 && errno != EAGAIN) { /* the process stopped reading: dropped */
            close_fd(&e->in_fd);
            send_ack(chan, n);
            return;
        }
        if (w > 0) {
            e->last_in = p[w - 1];
            send_ack(chan, (size_t)w);
            p += w;
            n -= (size_t)w;
        }
        if (!n) return;
    }
    if (e->in_off + e->in_len + n > e->in_cap) {
        if (e->in_len) memmove(e->in_buf, e->in_buf + e->in_off, e->in_len);
        e->in_off = 0;
        if (e->in_len + n > e->in_cap) {
            size_t cap = e->in_cap ? e->in_cap : MAX_DATA;
            while (cap < e->in_len + n) cap *= 2;
            uint8_t *b = realloc(e->in_buf, cap);
            if (!b) {
                exec_abort(e, "out of memory for stdin");
                return;
            }
            e->in_buf = b;
            e->in_cap = cap;
        }
    }
    memcpy(e->in_buf + e->in_off + e->in_len, p, n);
    e->in_len += n;
    exec_write_stdin(e);
}

/* ---- control ---------------------------------------------------------------------------- */

/* sig to the command's process group (it called setsid), or to the command alone while that
 * group does not exist yet. Nothing once the command was reaped: its number may be reused. */
static void exec_send_signal(struct exec *e, int sig)
{
    if (e->reaped) return;
    if (kill(-e->pid, sig) < 0) kill(e->pid, sig);
}

void exec_signal(uint32_t chan, const uint8_t *p, size_t n)
{
    struct exec *e = exec_find(chan);
    if (!e) return;
    uint32_t sig = n == 4 ? get_be32(p) : 0;
    if (sig == 0 || sig > 64) {
        agent_log("channel %u: ignoring malformed SIGNAL", chan);
        return;
    }
    exec_send_signal(e, (int)sig);
}

void exec_resize(uint32_t chan, const uint8_t *p, size_t n)
{
    struct exec *e = exec_find(chan);
    if (!e || !e->tty) return;
    if (n != 4) {
        agent_log("channel %u: ignoring malformed RESIZE", chan);
        return;
    }
    struct winsize ws = {.ws_row = get_be16(p), .ws_col = get_be16(p + 2)};
    ioctl(e->pty, TIOCSWINSZ, &ws); /* the kernel sends SIGWINCH */
}

/* SIGKILL to the command's process group; once the command is gone, stop waiting for
 * background processes that hold its output (they are the sandbox's, not the exec's). */
void exec_kill(uint32_t chan)
{
    struct exec *e = exec_find(chan);
    if (!e) return;
    exec_send_signal(e, SIGKILL);
    if (e->reaped) e->deadline = 0;
}

void exec_output_ack(uint32_t chan, const uint8_t *p, size_t n)
{
    struct exec *e = exec_find(chan);
    if (e) output_ack(chan, &e->out_unacked, p, n);
}

void exec_kill_all(void)
{
    for (struct exec *e = g_execs; e; e = e->next) exec_send_signal(e, SIGKILL);
    if (g_init > 0) kill(g_init, SIGKILL); /* and with it everything in the sandbox */
}

void exec_reap(void)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        if (pid == g_init) {
            agent_log("the sandbox init ended (status 0x%x); the next exec starts a new one", st);
            sandbox_forget();
            continue;
        }
        for (struct exec *e = g_execs; e; e = e->next)
            if (e->pid == pid && !e->reaped) {
                e->reaped = true;
                e->status = st;
                e->deadline = now_ms() + DRAIN_GRACE_MS;
            }
    }
}

/* ---- polling ---------------------------------------------------------------------------- */

size_t exec_poll_count(void)
{
    size_t n = g_ndrains;
    for (struct exec *e = g_execs; e; e = e->next) n += 3;
    return n;
}

size_t exec_poll_fill(struct pollfd *pfd)
{
    size_t n = 0;
    /* A full outgoing buffer stops process output, as does a spliced payload still waiting
     * for the port (one at a time). */
    bool room = out_data_room() && !splice_pending();
    uint64_t now = now_us();
#define ADD(slot, fd_, ev)                                                                     \
    do {                                                                                       \
        (slot) = (int)n;                                                                       \
        pfd[n++] = (struct pollfd){.fd = (fd_), .events = (ev)};                               \
    } while (0)
    for (struct exec *e = g_execs; e; e = e->next) {
        e->pfd_out = e->pfd_err = e->pfd_in = -1;
        /* A hold that is over is cleared here, so any hold left is one this poll honours (its
         * fd asks for no POLLIN) and exec_poll_timeout wakes the loop for it, even when it
         * runs out before the timeout is computed: that gap used to leave the fd held with
         * no timeout, the agent asleep until an unrelated frame came. */
        if (e->hold_out <= now) e->hold_out = 0;
        if (e->hold_err <= now) e->hold_err = 0;
        /* Output is read only while the host's credit lasts: a slow consumer slows its own
         * process, and the port stays free for every other channel. */
        bool credit = output_credit(e->out_unacked) > 0;
        /* A held fd is polled for nothing but a hang-up (always reported). */
        if (e->out_fd >= 0 && room && credit && (!e->final || e->owed_out))
            ADD(e->pfd_out, e->out_fd, e->hold_out > now ? 0 : POLLIN);
        if (e->err_fd >= 0 && room && credit && (!e->final || e->owed_err))
            ADD(e->pfd_err, e->err_fd, e->hold_err > now ? 0 : POLLIN);
        if (e->in_fd >= 0 && (e->in_len || e->in_eof) && out_free() >= CTRL_RESERVE)
            ADD(e->pfd_in, e->in_fd, POLLOUT);
    }
#undef ADD
    g_drain_pfd = n;
    for (size_t i = 0; i < g_ndrains; i++)
        pfd[n++] = (struct pollfd){.fd = g_drains[i].fd, .events = POLLIN};
    g_drain_polled = g_ndrains;
    return n;
}

/* Microseconds until the next drain grace or output hold ends, or -1 when none is running. */
int64_t exec_poll_timeout(void)
{
    uint64_t now = now_us(), next = UINT64_MAX;
    for (struct exec *e = g_execs; e; e = e->next) {
        if (e->reaped && !e->final && e->deadline * 1000u < next) next = e->deadline * 1000u;
        if (e->out_fd >= 0 && e->hold_out && e->hold_out < next) next = e->hold_out;
        if (e->err_fd >= 0 && e->hold_err && e->hold_err < next) next = e->hold_err;
    }
    if (next == UINT64_MAX) return -1;
    return next <= now ? 0 : next - now > 60000000u ? 60000000 : (int64_t)(next - now);
}

/* One read of process output into a frame; EOF (or EIO: a PTY without slave) closes it. After
 * the grace only the bytes owed are read, and the fd is closed once they were. A second short
 * read in a row holds the fd (see OUTPUT_HOLD_US). */
static void pump_output(struct exec *e, int *fd, uint8_t type, size_t *owed, uint64_t *hold,
                        bool *was_short)
{
    /* Pipes go out zero-copy where the kernel allows it (see send_spliced). */
    bool spliced = !e->tty && splice_ready();
    size_t frame = spliced ? OUTPUT_SPLICE_MAX : OUTPUT_READ_MAX;
    size_t credit = output_credit(e->out_unacked);
    size_t max = e->final && *owed < frame ? *owed : frame;
    if (credit < max) max = credit;
    if (!out_data_room() || splice_pending() || !max) return;
    ssize_t n = spliced ? send_spliced(type, e->chan, *fd, max)
                        : send_from_fd(type, e->chan, *fd, max);
    size_t full = e->tty && max > PTY_READ_MAX ? PTY_READ_MAX : max;
    bool is_short = n > 0 && (size_t)n < full;
    *hold = is_short && *was_short ? now_us() + OUTPUT_HOLD_US : 0;
    if (n >= 0) *was_short = is_short;
    if (n > 0) e->out_unacked += (size_t)n + OUTPUT_FRAME_COST;
    if (n > 0 && e->final) *owed -= (size_t)n;
    if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR))) return;
    if (n < 0 && errno != EIO) agent_log("channel %u: read output: %s", e->chan, strerror(errno));
    close_fd(fd);
}

static void drain_add(int *fd, int *extra)
{
    if (g_ndrains == g_drain_cap) {
        size_t cap = g_drain_cap ? 2 * g_drain_cap : 8;
        struct drain *d = realloc(g_drains, cap * sizeof *d);
        if (!d) { /* the writer gets EPIPE instead of a reader: still bounded */
            close_fd(fd);
            close_fd(extra);
            return;
        }
        g_drains = d;
        g_drain_cap = cap;
    }
    g_drains[g_ndrains++] = (struct drain){*fd, *extra};
    *fd = *extra = -1;
}

/* The grace ended: what was in the pipes then is still delivered, nothing after it. */
static void exec_end_grace(struct exec *e)
{
    e->final = true;
    int avail = 0;
    if (e->out_fd >= 0 && ioctl(e->out_fd, FIONREAD, &avail) == 0 && avail > 0)
        e->owed_out = (size_t)avail;
    avail = 0;
    if (e->err_fd >= 0 && ioctl(e->err_fd, FIONREAD, &avail) == 0 && avail > 0)
        e->owed_err = (size_t)avail;
}

/* EXIT goes out once the command is reaped and its output read to EOF, or read up to what
 * was owed when the grace ended; fds still held by background processes go to the drains. */
static bool exec_finish(struct exec *e)
{
    if (!e->reaped) return false;
    if (!e->final && e->deadline <= now_ms()) exec_end_grace(e);
    bool open_out = e->out_fd >= 0 && (!e->final || e->owed_out);
    bool open_err = e->err_fd >= 0 && (!e->final || e->owed_err);
    if (open_out || open_err) return false;
    if (out_free() < HDR_SIZE + 8) return false;
    int st = e->status;
    uint32_t code = 126, sig = 0;
    if (WIFEXITED(st)) code = (uint32_t)WEXITSTATUS(st);
    else if (WIFSIGNALED(st)) sig = (uint32_t)WTERMSIG(st), code = 128 + sig;
    uint8_t b[8];
    put_be32(b, code);
    put_be32(b + 4, sig);
    send_frame(F_EXIT, e->chan, b, 8, NULL, 0);
    int none = -1;
    if (e->out_fd >= 0) drain_add(&e->out_fd, e->tty ? &e->pty : &none);
    if (e->err_fd >= 0) drain_add(&e->err_fd, &none);
    return true;
}

static void drains_handle(const struct pollfd *pfd)
{
    static uint8_t scratch[MAX_DATA];
    size_t kept = 0;
    for (size_t i = 0; i < g_ndrains; i++) {
        struct drain *d = &g_drains[i];
        bool done = false;
        if (i < g_drain_polled && pfd[g_drain_pfd + i].revents) {
            ssize_t n = read(d->fd, scratch, sizeof scratch);
            done = n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR);
        }
        if (done) {
            close_fd(&d->fd);
            close_fd(&d->extra);
        } else {
            g_drains[kept++] = *d;
        }
    }
    g_ndrains = kept;
    g_drain_polled = 0;
}

void exec_poll_handle(const struct pollfd *pfd)
{
    for (struct exec **pp = &g_execs; *pp;) {
        struct exec *e = *pp;
        if (e->pfd_out >= 0 && pfd[e->pfd_out].revents)
            pump_output(e, &e->out_fd, F_STDOUT, &e->owed_out, &e->hold_out, &e->short_out);
        if (e->pfd_err >= 0 && pfd[e->pfd_err].revents)
            pump_output(e, &e->err_fd, F_STDERR, &e->owed_err, &e->hold_err, &e->short_err);
        if (e->pfd_in >= 0 && pfd[e->pfd_in].revents) exec_write_stdin(e);
        e->pfd_out = e->pfd_err = e->pfd_in = -1;
        if (exec_finish(e)) {
            *pp = e->next;
            exec_free(e);
        } else {
            pp = &e->next;
        }
    }
    drains_handle(pfd);
}
