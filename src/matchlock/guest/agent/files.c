/* matchlock guest agent: FILE_WRITE, FILE_READ, FILE_LIST. They run as root in the agent's
 * own namespace. Reads and listings are produced a frame at a time from the poll loop, so a
 * large file or directory never blocks the agent or grows the outgoing buffer. */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum op_kind { OP_WRITE, OP_READ, OP_LIST };

struct fileop {
    struct fileop *next;
    uint32_t chan;
    enum op_kind kind;
    int fd;         /* WRITE: the temporary file; READ: the file */
    DIR *dir;       /* LIST */
    char *path;     /* WRITE: destination */
    char *tmp;      /* WRITE: temporary name in the destination's directory */
    int err;        /* WRITE: the first failure, reported by the final RESULT */
    char msg[512];
    unsigned skipped; /* LIST: entries whose names are not UTF-8 (the host could not take them) */
    size_t unacked; /* READ: output credit in use (OUTPUT_WINDOW, as an exec's output) */
};

static struct fileop *g_ops;

static struct fileop *op_find(uint32_t chan)
{
    for (struct fileop *op = g_ops; op; op = op->next)
        if (op->chan == chan) return op;
    return NULL;
}

bool file_exists(uint32_t chan) { return op_find(chan) != NULL; }

/* Bytes a read may send now: FILE_DATA is credited as an exec's output (payload + frame
 * cost against OUTPUT_WINDOW), so a host consumer that stops taking data stops this read and
 * nothing else. */
static size_t read_credit(const struct fileop *op)
{
    size_t c = output_credit(op->unacked);
    return c < MAX_DATA ? c : MAX_DATA;
}

void file_output_ack(uint32_t chan, const uint8_t *p, size_t n)
{
    struct fileop *op = op_find(chan);
    if (op && op->kind == OP_READ) output_ack(chan, &op->unacked, p, n);
}

static struct fileop *op_new(uint32_t chan, enum op_kind kind)
{
    struct fileop *op = calloc(1, sizeof *op);
    if (!op) return NULL;
    op->chan = chan;
    op->kind = kind;
    op->fd = -1;
    op->next = g_ops;
    g_ops = op;
    return op;
}

static void op_free(struct fileop *op)
{
    for (struct fileop **pp = &g_ops; *pp; pp = &(*pp)->next)
        if (*pp == op) {
            *pp = op->next;
            break;
        }
    if (op->fd >= 0) close(op->fd);
    if (op->dir) closedir(op->dir);
    if (op->tmp && op->err) unlink(op->tmp);
    free(op->path);
    free(op->tmp);
    free(op);
}

/* PATH (absolute, required) and MODE (optional) of a file request; NULL on error, with errno
 * and a message in why. */
static char *parse_path(const uint8_t *p, size_t n, uint32_t *mode, char *why, size_t wsz)
{
    struct tlv t = {p, n, 0};
    struct tlv_field f;
    char *path = NULL;
    int rc;
    while ((rc = tlv_next(&t, &f)) > 0) {
        if (f.tag == FILE_PATH) {
            free(path);
            if (!(path = tlv_strdup(&f))) {
                snprintf(why, wsz, "bad PATH");
                errno = EINVAL;
                return NULL;
            }
        } else if (f.tag == FILE_MODE && mode && f.len == 4) {
            *mode = get_be32(f.val) & 07777;
        }
    }
    if (rc < 0 || !path || path[0] != '/') {
        snprintf(why, wsz, "%s", rc < 0 ? "malformed TLV" : !path ? "no PATH" : "PATH is not absolute");
        free(path);
        errno = EINVAL;
        return NULL;
    }
    return path;
}

/* ---- FILE_WRITE ----------------------------------------------------------------------------- */

static void op_fail(struct fileop *op, int err, const char *what)
{
    if (op->err) return;
    op->err = err;
    snprintf(op->msg, sizeof op->msg, "%s %s: %s", what, op->path ? op->path : "", strerror(err));
}

/* As the reference agent does. */
int make_parents(char *path)
{
    for (char *s = strchr(path + 1, '/'); s; s = strchr(s + 1, '/')) {
        *s = 0;
        int rc = mkdir(path, 0755);
        int e = errno;
        *s = '/';
        if (rc < 0 && e != EEXIST) {
            errno = e;
            return -1;
        }
    }
    return 0;
}

void file_write_begin(uint32_t chan, const uint8_t *p, size_t n)
{
    if (channel_busy(chan)) {
        agent_log("ignoring FILE_WRITE on channel %u, which is in use", chan);
        return;
    }
    struct fileop *op = op_new(chan, OP_WRITE);
    if (!op) {
        send_result(chan, ENOMEM, "FILE_WRITE: out of memory");
        return;
    }
    /* Failures are kept until the final empty FILE_DATA, so the channel always ends the same
     * way: the host streams its data, then gets one RESULT. */
    uint32_t mode = 0644;
    char why[64];
    if (!(op->path = parse_path(p, n, &mode, why, sizeof why))) {
        op->err = EINVAL;
        snprintf(op->msg, sizeof op->msg, "FILE_WRITE: %s", why);
        return;
    }
    char *slash = strrchr(op->path, '/');
    if (!slash[1] || !strcmp(slash + 1, ".") || !strcmp(slash + 1, "..")) {
        op_fail(op, EISDIR, "write");
        return;
    }
    if (make_parents(op->path) < 0) {
        op_fail(op, errno, "create the parent directories of");
        return;
    }
    /* A temporary name in the same directory, renamed over the path at the end: readers see
     * the old file or the new one, never half of it. Channel ids are unique while open. */
    size_t dirlen = (size_t)(slash - op->path);
    size_t size = dirlen + 40;
    if (!(op->tmp = malloc(size))) {
        op_fail(op, ENOMEM, "write");
        return;
    }
    snprintf(op->tmp, size, "%.*s/.matchlock-write-%u", (int)dirlen, op->path, chan);
    unlink(op->tmp);
    op->fd = open(op->tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (op->fd < 0 || fchmod(op->fd, mode) < 0) op_fail(op, errno, "write");
}

void file_data(uint32_t chan, const uint8_t *p, size_t n)
{
    struct fileop *op = op_find(chan);
    if (!op || op->kind != OP_WRITE) {
        if (op) agent_log("channel %u: FILE_DATA for a read or list; ignored", chan);
        return;
    }
    if (n == 0) { /* end of data */
        if (!op->err && close(op->fd) < 0) op_fail(op, errno, "write");
        op->fd = -1;
        if (!op->err && rename(op->tmp, op->path) < 0) op_fail(op, errno, "write");
        send_result(chan, op->err, "%s", op->err ? op->msg : "");
        op_free(op);
        return;
    }
    if (op->err) return; /* already failed: the rest is dropped, the RESULT tells */
    if (n > MAX_DATA) {
        op_fail(op, EINVAL, "FILE_DATA larger than 65536 bytes for");
        return;
    }
    for (size_t off = 0; off < n;) {
        ssize_t w = write(op->fd, p + off, n - off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) {
            op_fail(op, errno, "write");
            return;
        }
        off += (size_t)w;
    }
}

void file_kill(uint32_t chan)
{
    struct fileop *op = op_find(chan);
    if (!op) return;
    /* A write's temporary file goes (op_free unlinks it once err is set); later FILE_DATA for
     * this channel finds no operation and is ignored. */
    op_fail(op, ECANCELED, "cancelled:");
    send_result(chan, ECANCELED, "%s", op->msg);
    op_free(op);
}

/* ---- FILE_READ / FILE_LIST ---------------------------------------------------------------- */

void file_read_begin(uint32_t chan, const uint8_t *p, size_t n)
{
    if (channel_busy(chan)) {
        agent_log("ignoring FILE_READ on channel %u, which is in use", chan);
        return;
    }
    char why[64];
    char *path = parse_path(p, n, NULL, why, sizeof why);
    if (!path) {
        send_result(chan, EINVAL, "FILE_READ: %s", why);
        return;
    }
    /* O_NONBLOCK: a FIFO must not block the agent before fstat can refuse it. */
    int fd = open(path, O_RDONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
    struct stat st;
    struct fileop *op = NULL;
    if (fd < 0 || fstat(fd, &st) < 0) send_result(chan, errno, "read %s: %s", path, strerror(errno));
    else if (S_ISDIR(st.st_mode)) send_result(chan, EISDIR, "read %s: Is a directory", path);
    else if (!S_ISREG(st.st_mode)) send_result(chan, EINVAL, "read %s: not a regular file", path);
    else if (!(op = op_new(chan, OP_READ))) send_result(chan, ENOMEM, "read %s: out of memory", path);
    if (op) op->fd = fd;
    else if (fd >= 0) close(fd);
    free(path);
}

void file_list_begin(uint32_t chan, const uint8_t *p, size_t n)
{
    if (channel_busy(chan)) {
        agent_log("ignoring FILE_LIST on channel %u, which is in use", chan);
        return;
    }
    char why[64];
    char *path = parse_path(p, n, NULL, why, sizeof why);
    if (!path) {
        send_result(chan, EINVAL, "FILE_LIST: %s", why);
        return;
    }
    DIR *d = opendir(path);
    struct fileop *op = NULL;
    if (!d) send_result(chan, errno, "list %s: %s", path, strerror(errno));
    else if (!(op = op_new(chan, OP_LIST))) send_result(chan, ENOMEM, "list %s: out of memory", path);
    if (op) op->dir = d;
    else if (d) closedir(d);
    free(path);
}

/* Queue one DIRENT; false when the listing is complete (RESULT sent). */
static bool list_one(struct fileop *op)
{
    errno = 0;
    struct dirent *d = readdir(op->dir);
    if (!d) {
        if (errno) send_result(op->chan, errno, "list: %s", strerror(errno));
        else if (op->skipped)
            send_result(op->chan, 0, "skipped %u entries whose names are not UTF-8", op->skipped);
        else send_result(op->chan, 0, "%s", "");
        return false;
    }
    const char *name = d->d_name;
    size_t nl = strlen(name);
    struct stat st;
    if (!strcmp(name, ".") || !strcmp(name, "..")) return true;
    /* Entries that vanished since readdir are skipped. */
    if (fstatat(dirfd(op->dir), name, &st, AT_SYMLINK_NOFOLLOW) < 0) return true;
    if (!utf8_valid(name, nl)) {
        op->skipped++;
        return true;
    }
    uint8_t b[6 + 255 + 6 + 4 + 6 + 8 + 6 + 8], *q = b;
    put_be16(q, FILE_NAME), put_be32(q + 2, (uint32_t)nl), memcpy(q + 6, name, nl), q += 6 + nl;
    put_be16(q, FILE_MODE), put_be32(q + 2, 4), put_be32(q + 6, st.st_mode), q += 10;
    put_be16(q, FILE_SIZE), put_be32(q + 2, 8), put_be64(q + 6, (uint64_t)st.st_size), q += 14;
    put_be16(q, FILE_MTIME), put_be32(q + 2, 8), put_be64(q + 6, (uint64_t)st.st_mtime), q += 14;
    send_frame(F_DIRENT, op->chan, b, (size_t)(q - b), NULL, 0);
    return true;
}

static bool list_room(void) { return out_free() >= CTRL_RESERVE + 1024; }

bool file_pump(void)
{
    bool more = false;
    for (struct fileop *op = g_ops, *next; op; op = next) {
        next = op->next;
        size_t credit = op->kind == OP_READ ? read_credit(op) : 0;
        if (op->kind == OP_READ && credit && out_data_room()) {
            ssize_t r = send_from_fd(F_FILE_DATA, op->chan, op->fd, credit);
            if (r > 0 || (r < 0 && errno == EINTR)) {
                if (r > 0) op->unacked += (size_t)r + OUTPUT_FRAME_COST;
                more = true;
                continue;
            }
            send_result(op->chan, r < 0 ? errno : 0, "%s", r < 0 ? strerror(errno) : "");
            op_free(op);
        } else if (op->kind == OP_LIST) {
            bool going = true;
            while (list_room() && (going = list_one(op))) {
            }
            if (!going) op_free(op);
        }
    }
    /* Work that can go on right now, without waiting for the port to drain. */
    for (struct fileop *op = g_ops; op && !more; op = op->next)
        more = (op->kind == OP_READ && read_credit(op) && out_data_room()) ||
               (op->kind == OP_LIST && list_room());
    return more;
}
