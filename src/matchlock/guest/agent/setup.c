/* matchlock guest agent: PID-1 duties. Boot mounts, finding the port, SETUP (root switch,
 * clock, entropy, hostname, resolver) and powering off. */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* From <linux/random.h>, which musl does not ship. */
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#define RNDRESEEDCRNG _IO('R', 0x07)
/* From <linux/fs.h>. */
#define BLKFLSBUF _IO(0x12, 97)
/* From <linux/magic.h>. */
#define OVERLAYFS_SUPER_MAGIC 0x794c7630
struct rand_pool {
    int entropy_count; /* bits */
    int buf_size;      /* bytes */
    uint8_t buf[256];
};

#define PORT_NAME "matchlock"
#define PORT_FALLBACK "vport0p1"

/* Extra disks (see SETUP_DISK); where they are mounted after the switch, for power_off to
 * remount them read-only. */
#define MAX_DISKS 8
#define DISK_RO 1
static char *g_disk_paths[MAX_DISKS];
static size_t g_ndisks;

/* ---- boot -------------------------------------------------------------------------------- */

void boot_pid1(void)
{
    /* The kernel mounts nothing for us (no devtmpfs automount) and opens no console when the
     * initramfs lacks /dev/console, so fds 0-2 may be closed: fill them before opening
     * anything else, or the port would land on fd 0-2. */
    mkdir("/dev", 0755);
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) >= 0) continue;
        if (open("/dev/console", O_RDWR | O_NOCTTY) < 0) open("/dev/null", O_RDWR);
    }
    mkdir("/proc", 0555);
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mkdir("/sys", 0555);
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

static bool find_named_port(char *dev, size_t size)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return false;
    bool found = false;
    struct dirent *e;
    while (!found && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[300], name[64] = {0};
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, name, sizeof name - 1);
        close(fd);
        if (n > 0 && name[n - 1] == '\n') name[n - 1] = 0;
        if (strcmp(name, PORT_NAME) == 0) {
            snprintf(dev, size, "/dev/%s", e->d_name);
            found = true;
        }
    }
    closedir(d);
    return found;
}

int open_port(void)
{
    /* The device announces its ports after the driver probed, and each port's name a moment
     * after the port itself, so both may still be missing when we start. The fallback port is
     * only taken once it has existed for a while without any port being named for us. */
    for (int tick = 0; tick < 1000; tick++) { /* 10 ms ticks: give up after 10 s */
        char dev[300];
        bool ok = find_named_port(dev, sizeof dev);
        if (!ok && tick >= 20 && access("/dev/" PORT_FALLBACK, F_OK) == 0) {
            snprintf(dev, sizeof dev, "/dev/%s", PORT_FALLBACK);
            ok = true;
        }
        if (ok) {
            int fd = open(dev, O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
            if (fd >= 0) return fd;
            dprintf(2, "matchlock-agent: open %s: %s\n", dev, strerror(errno));
        }
        usleep(10000);
    }
    dprintf(2, "matchlock-agent: FATAL: no virtio-serial port named %s and no /dev/%s\n",
            PORT_NAME, PORT_FALLBACK);
    power_off();
}

void power_off(void)
{
    kill(-1, SIGKILL); /* everything but us (the sandbox init too, and so its namespace) */
    for (int i = 0; i < 200 && waitpid(-1, NULL, WNOHANG) >= 0; i++) usleep(10000);
    /* The overlay root and the layers under it cannot be unmounted from inside the root
     * itself; sync() leaves the writable ext4 layer consistent (the journal records it). */
    sync();
    /* Volumes outlive this VM: read-only now, ext4 checkpoints its journal and marks itself
     * clean, so the next sandbox can mount it even read-only (on a read-only device). */
    for (size_t i = 0; i < g_ndisks; i++)
        mount(NULL, g_disk_paths[i], NULL, MS_REMOUNT | MS_RDONLY, NULL);
    reboot(RB_AUTOBOOT); /* kernel reboot=t + QEMU -no-reboot: QEMU exits */
    for (;;) pause();    /* PID 1 must never exit: that panics the kernel */
}

/* ---- SETUP ------------------------------------------------------------------------------- */

/* A host folder or file: entry <entry> of virtio-9p share ml<share> (ml0 read-only, ml1
 * read-write), see sandbox/mounts.py. */
#define MAX_SHARES 16
enum { SHARE_RO = 0, SHARE_OVERLAY = 1, SHARE_HOST_FS = 2 };
enum { SHARE_DIR = 0, SHARE_FILE = 1 };
struct share {
    uint8_t share, mode, kind, entry;
    char *path; /* absolute guest path, checked by parse_setup */
};

/* An extra disk (sandbox/disks.py): virtio-blk slot <slot>, whose serial is mlvol<slot>,
 * holds an ext4 file system to mount at <path>. */
struct disk {
    uint8_t slot, flags;
    char *path;
};

#define MAX_WARM_ARGS 16
#define WARM_TIMEOUT_MS 20000 /* well within the host's wait for PREPARE */

struct setup {
    struct share shares[MAX_SHARES];
    size_t nshares;
    struct disk disks[MAX_DISKS];
    size_t ndisks;
    char *hostname, *root_dev, *upper_dev, *resolv;
    const char *ca; /* SETUP_CA: PEM, in the request's buffer */
    size_t ca_len;
    char **hosts;
    size_t nhosts;
    char *warm[MAX_WARM_ARGS + 1]; /* PREPARE's warm-up command, NULL-terminated */
    size_t nwarm;
    bool have_clock;
    uint64_t clock_ns;
    const uint8_t *entropy;
    size_t entropy_len;
    uint32_t cpu_quota_us; /* per 100 ms period; 0 = no limit */
    bool have_net;
    uint32_t net_addr, net_gw, net_mtu; /* host byte order */
    uint8_t net_prefix;
};

static int s_err;
static char s_msg[1024];
static bool g_setup_done; /* SETUP was received (whatever its outcome) */
static bool g_setup_ok;   /* ... and succeeded */
static bool g_ca_done;    /* the CA was installed (SETUP's CA field, or the CA frame) */
static bool g_prepared;   /* PREPARE switched to the image's root */

/* Record errno and a message for the RESULT; returns -1 for `return fail(...)`. */
static __attribute__((format(printf, 1, 2))) int fail(const char *fmt, ...)
{
    int e = errno ? errno : EIO;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(s_msg, sizeof s_msg, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < sizeof s_msg - 3)
        snprintf(s_msg + n, sizeof s_msg - (size_t)n, ": %s", strerror(e));
    s_err = e;
    return -1;
}

static int mkdir_ok(const char *path, mode_t mode)
{
    return mkdir(path, mode) == 0 || errno == EEXIST ? 0 : -1;
}

static bool valid_dev_name(const char *s)
{
    size_t n = strlen(s);
    return n > 0 && n < 64 && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..");
}

/* Write a whole file under a temporary name and rename it into place, so readers never see
 * half a file and a symlink at path (e.g. resolv.conf -> systemd) is replaced, not followed. */
static int write_file_atomic(const char *path, const char *data, size_t len)
{
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.matchlock-tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) return fail("create %s", tmp);
    for (size_t off = 0; off < len;) {
        ssize_t n = write(fd, data + off, len - off);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            fail("write %s", tmp);
            close(fd);
            unlink(tmp);
            return -1;
        }
        off += (size_t)n;
    }
    fchmod(fd, 0644);
    if (close(fd) < 0 || rename(tmp, path) < 0) {
        fail("write %s", path);
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* Mount ROOT_DEV read-only under a writable layer, then make the overlay the root the way
 * switch_root does: the initramfs is the kernel's rootfs, which pivot_root refuses. The
 * initramfs holds only this binary, so it is simply left behind, hidden under the new root. */
/* When this VM was restored from a snapshot, the kernel probed its disks at boot, when other
 * files backed them: drop whatever of them it cached before mounting. */
static void flush_block_cache(const char *dev)
{
    int fd = open(dev, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ioctl(fd, BLKFLSBUF, 0);
        close(fd);
    }
}

static int mount_shares(const struct setup *s);
static int mount_disks(const struct setup *s);

static int switch_root(const struct setup *s)
{
    const char *root_dev = s->root_dev, *upper_dev = s->upper_dev;
    char dev[80];
    const char *dirs[] = {"/mnt", "/mnt/lower", "/mnt/upperfs", "/mnt/root"};
    for (size_t i = 0; i < sizeof dirs / sizeof *dirs; i++)
        if (mkdir_ok(dirs[i], 0755)) return fail("mkdir %s", dirs[i]);

    snprintf(dev, sizeof dev, "/dev/%s", root_dev);
    flush_block_cache(dev);
    if (mount(dev, "/mnt/lower", "ext4", MS_RDONLY, NULL))
        return fail("mount %s (ext4, read-only) on /mnt/lower", dev);
    if (upper_dev) {
        snprintf(dev, sizeof dev, "/dev/%s", upper_dev);
        flush_block_cache(dev);
        /* The layer is made with lazy_itable_init and thrown away with the sandbox: no
         * background thread zeroing its inode tables (emulated I/O competing with the execs). */
        if (mount(dev, "/mnt/upperfs", "ext4", 0, "noinit_itable"))
            return fail("mount %s (ext4) on /mnt/upperfs", dev);
    } else if (mount("tmpfs", "/mnt/upperfs", "tmpfs", 0, "mode=0755")) {
        return fail("mount tmpfs on /mnt/upperfs");
    }
    if (mkdir_ok("/mnt/upperfs/upper", 0755) || mkdir_ok("/mnt/upperfs/work", 0755))
        return fail("create upper/ and work/ in the writable layer");
    if (mount("overlay", "/mnt/root", "overlay", 0,
              "lowerdir=/mnt/lower,upperdir=/mnt/upperfs/upper,workdir=/mnt/upperfs/work"))
        return fail("mount the overlay root");
    if (mount_shares(s) || mount_disks(s)) return -1;

    const char *moved[] = {"/dev", "/proc", "/sys"};
    for (size_t i = 0; i < sizeof moved / sizeof *moved; i++) {
        char target[32];
        snprintf(target, sizeof target, "/mnt/root%s", moved[i]);
        if (mkdir_ok(target, 0755)) return fail("mkdir %s", target);
        if (mount(moved[i], target, NULL, MS_MOVE, NULL))
            return fail("move %s to %s", moved[i], target);
    }
    if (chdir("/mnt/root") || mount(".", "/", NULL, MS_MOVE, NULL) || chroot(".") ||
        chdir("/"))
        return fail("switch to the new root");
    /* Per-exec mount namespaces copy this tree; private propagation keeps their mounts (their
     * own /proc, anything a privileged exec mounts) from leaking back here. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL))
        return fail("make the root mount private");
    return 0;
}

static int mount_guest_dev(void)
{
    /* A private devpts instance; /dev/ptmx must lead to it, not to devtmpfs's node. */
    if (mkdir_ok("/dev/pts", 0755) ||
        mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620,gid=5"))
        return fail("mount devpts on /dev/pts");
    unlink("/dev/ptmx");
    if (symlink("pts/ptmx", "/dev/ptmx")) return fail("symlink /dev/ptmx");
    if (mkdir_ok("/dev/shm", 01777) ||
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"))
        return fail("mount tmpfs on /dev/shm");
    /* devtmpfs lacks the /proc links that udev would add; shells rely on them. */
    symlink("/proc/self/fd", "/dev/fd");
    symlink("/proc/self/fd/0", "/dev/stdin");
    symlink("/proc/self/fd/1", "/dev/stdout");
    symlink("/proc/self/fd/2", "/dev/stderr");
    if (mkdir("/tmp", 01777) == 0) chmod("/tmp", 01777); /* mkdir honours the umask */
    else if (errno != EEXIST) return fail("mkdir /tmp");
    return 0;
}

/* Files an image template made for SETUP to fill in (prepare_files): filled in place, a
 * clone's first writes to its upper layer are no copy-up of /etc, no inode or block
 * allocation, no truncation and no rename, each a kernel path that TCG translates afresh after
 * every restore (~30 ms in all). Appends data to the file at path if it is the one PREPARE
 * left there (regular, root's, 0644, one link, `size` bytes long): 0 done, 1 not that file
 * (nothing written), -1 a failed write. */
static int append_prepared(const char *path, const char *data, size_t len, off_t size)
{
    if (!g_prepared) return 1;
    int fd = open(path, O_WRONLY | O_APPEND | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) return 1;
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode) || st.st_nlink != 1 || st.st_uid != 0 ||
        (st.st_mode & 07777) != 0644 || st.st_size != size) {
        close(fd);
        return 1;
    }
    for (size_t off = 0; off < len;) {
        ssize_t n = write(fd, data + off, len - off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (n == 0) errno = EIO;
            fail("write %s", path);
            close(fd);
            return -1;
        }
        off += (size_t)n;
    }
    if (close(fd)) return fail("write %s", path);
    return 0;
}

/* hostname, hosts, resolv.conf: in place when PREPARE made them, else written atomically. */
static int write_setup_file(const char *path, const char *data, size_t len)
{
    int rc = append_prepared(path, data, len, 0);
    return rc <= 0 ? rc : write_file_atomic(path, data, len);
}

/* ---- the sandbox CA (SETUP_CA) -------------------------------------------------------------- */

/* Where images keep their roots (the first one found is the image's bundle), as the host's
 * sandbox/network.py lists them, and where the sandbox CA goes. */
static const char *const ca_bundles[] = {
    "/etc/ssl/certs/ca-certificates.crt", /* Debian, Ubuntu, Alpine */
    "/etc/pki/tls/certs/ca-bundle.crt",   /* Fedora, RHEL */
    "/etc/ssl/cert.pem",                  /* Alpine (LibreSSL), macOS-like layouts */
};
#define N_CA_BUNDLES (sizeof ca_bundles / sizeof *ca_bundles)
#define GUEST_CA "/etc/matchlock/ca.pem"
#define GUEST_BUNDLE "/etc/matchlock/ca-bundle.pem"
#define MAX_BUNDLE (8u << 20)

static bool g_ca_prepared;   /* PREPARE wrote the CA files without the CA (g_roots_len bytes) */
static bool g_resolv_prepared; /* PREPARE made /etc/resolv.conf empty: SETUP must fill it */
static off_t g_roots_len;
static unsigned g_bundle_targets; /* bit i: ca_bundles[i] gets the merged bundle */

/* The image's roots: the first bundle found, with a final newline (*roots NULL, *len 0 if
 * none); *targets: the bundles found, or the first path if none was. A bundle counts if it
 * is a regular file of the overlay root (an image's symlink into /proc, /sys or /dev is left
 * alone); larger than MAX_BUNDLE fails (EFBIG). */
static int read_roots(char **roots, size_t *len, unsigned *targets)
{
    *roots = NULL;
    *len = 0;
    *targets = 0;
    for (size_t i = 0; i < N_CA_BUNDLES; i++) {
        struct stat st;
        /* Never open a device node or FIFO of the image (opening one can have effects). */
        if (stat(ca_bundles[i], &st) || !S_ISREG(st.st_mode)) continue;
        int fd = open(ca_bundles[i], O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (fd < 0) continue;
        struct statfs fs;
        if (fstat(fd, &st) || !S_ISREG(st.st_mode) || fstatfs(fd, &fs) ||
            fs.f_type != OVERLAYFS_SUPER_MAGIC) {
            close(fd);
            continue;
        }
        if (st.st_size > MAX_BUNDLE) {
            close(fd);
            errno = EFBIG;
            return fail("the image's CA bundle %s is larger than %u MiB, so the sandbox CA "
                        "cannot be added to it", ca_bundles[i], MAX_BUNDLE >> 20);
        }
        *targets |= 1u << i;
        if (*roots) {
            close(fd);
            continue;
        }
        size_t size = (size_t)st.st_size, got = 0;
        char *buf = malloc(size + 1);
        if (!buf) {
            close(fd);
            return fail("read %s", ca_bundles[i]);
        }
        int err = 0;
        while (got < size && !err) {
            ssize_t n = read(fd, buf + got, size - got);
            if (n > 0) got += (size_t)n;
            else if (n == 0) err = EIO; /* shorter than fstat said */
            else if (errno != EINTR) err = errno;
        }
        close(fd);
        if (err) {
            free(buf);
            errno = err;
            return fail("read %s", ca_bundles[i]);
        }
        if (got && buf[got - 1] != '\n') buf[got++] = '\n';
        *roots = buf;
        *len = got;
    }
    if (!*targets) *targets = 1;
    return 0;
}

static int write_new_file(const char *path, const char *data, size_t len)
{
    char dir[256];
    snprintf(dir, sizeof dir, "%s", path);
    if (make_parents(dir)) return fail("create the parent directories of %s", path);
    return write_file_atomic(path, data, len);
}

/* Our CA alone (GUEST_CA), and the image's roots with it appended (GUEST_BUNDLE and the
 * image's own bundles, for the tools that ignore SSL_CERT_FILE). pem NULL (PREPARE): the same
 * files without the CA, for SETUP to append it to. */
static int write_ca_files(const char *pem, size_t pem_len)
{
    char *roots;
    size_t len;
    unsigned targets;
    if (read_roots(&roots, &len, &targets)) return -1;
    char *merged = malloc(len + pem_len + 1);
    int rc = merged ? 0 : fail("install the sandbox CA");
    if (rc == 0) {
        if (len) memcpy(merged, roots, len);
        if (pem_len) memcpy(merged + len, pem, pem_len);
        rc = write_new_file(GUEST_CA, pem_len ? pem : "", pem_len);
    }
    if (rc == 0) rc = write_new_file(GUEST_BUNDLE, merged, len + pem_len);
    for (size_t i = 0; rc == 0 && i < N_CA_BUNDLES; i++)
        if (targets & (1u << i)) rc = write_new_file(ca_bundles[i], merged, len + pem_len);
    free(merged);
    free(roots);
    if (rc == 0 && !pem) {
        g_ca_prepared = true;
        g_roots_len = (off_t)len;
        g_bundle_targets = targets;
    }
    return rc;
}

/* SETUP's CA field, or the CA frame that follows a SETUP without one. */
static int install_ca(const struct setup *s)
{
    if (!s->ca) return 0;
    g_ca_done = true; /* one attempt */
    if (!g_ca_prepared) return write_ca_files(s->ca, s->ca_len);
    int rc = append_prepared(GUEST_CA, s->ca, s->ca_len, 0);
    if (rc == 0) rc = append_prepared(GUEST_BUNDLE, s->ca, s->ca_len, g_roots_len);
    for (size_t i = 0; rc == 0 && i < N_CA_BUNDLES; i++)
        if (g_bundle_targets & (1u << i))
            rc = append_prepared(ca_bundles[i], s->ca, s->ca_len, g_roots_len);
    if (rc > 0) { /* cannot happen: nothing runs between PREPARE and SETUP */
        errno = EEXIST;
        return fail("install the sandbox CA: a file PREPARE made was changed");
    }
    return rc;
}

/* PREPARE: the files every SETUP writes, made empty in the template (see append_prepared):
 * hostname and hosts always, resolv.conf and the CA files when PREPARE says SETUP will bring
 * them (RESOLV, CA: their values are ignored here). */
static int prepare_files(const struct setup *s)
{
    if (mkdir_ok("/etc", 0755)) return fail("mkdir /etc");
    if (write_file_atomic("/etc/hostname", "", 0) || write_file_atomic("/etc/hosts", "", 0))
        return -1;
    if (s->resolv) {
        if (write_file_atomic("/etc/resolv.conf", "", 0)) return -1;
        g_resolv_prepared = true;
    }
    return s->ca ? write_ca_files(NULL, 0) : 0;
}

static int set_identity(const struct setup *s)
{
    if (mkdir_ok("/etc", 0755)) return fail("mkdir /etc");
    const char *name = s->hostname ? s->hostname : "localhost";
    if (sethostname(name, strlen(name))) return fail("sethostname %s", name);
    char line[300];
    snprintf(line, sizeof line, "%s\n", name);
    if (write_setup_file("/etc/hostname", line, strlen(line))) return -1;

    size_t size = 256 + strlen(name);
    for (size_t i = 0; i < s->nhosts; i++) size += strlen(s->hosts[i]) + 1;
    char *hosts = malloc(size);
    if (!hosts) return fail("build /etc/hosts");
    int n = snprintf(hosts, size,
                     "127.0.0.1\tlocalhost\n"
                     "::1\tlocalhost ip6-localhost ip6-loopback\n"
                     "127.0.1.1\t%s\n",
                     name);
    size_t len = n > 0 ? (size_t)n : 0;
    for (size_t i = 0; i < s->nhosts; i++) {
        size_t l = strlen(s->hosts[i]);
        memcpy(hosts + len, s->hosts[i], l);
        len += l;
        hosts[len++] = '\n';
    }
    int rc = write_setup_file("/etc/hosts", hosts, len);
    free(hosts);
    if (rc) return -1;
    if (s->resolv && write_setup_file("/etc/resolv.conf", s->resolv, strlen(s->resolv)))
        return -1;
    if (!s->resolv && g_resolv_prepared) {
        errno = EINVAL;
        return fail("SETUP: RESOLV missing, but PREPARE made /etc/resolv.conf for it");
    }
    return 0;
}

static int set_clock_and_entropy(const struct setup *s)
{
    if (s->have_clock) {
        struct timespec ts = {.tv_sec = (time_t)(s->clock_ns / 1000000000u),
                              .tv_nsec = (long)(s->clock_ns % 1000000000u)};
        if (clock_settime(CLOCK_REALTIME, &ts)) return fail("set the clock");
    }
    if (s->entropy_len) {
        struct rand_pool rp = {.entropy_count = (int)s->entropy_len * 8,
                               .buf_size = (int)s->entropy_len};
        memcpy(rp.buf, s->entropy, s->entropy_len);
        int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        int rc = fd < 0 ? -1 : ioctl(fd, RNDADDENTROPY, &rp);
        if (rc) fail("credit entropy (RNDADDENTROPY)");
        /* A VM restored from a snapshot shares the template's RNG state with every other
         * clone: reseed now, so nothing it draws from here on is shared or predictable. */
        if (rc == 0 && ioctl(fd, RNDRESEEDCRNG) != 0) rc = fail("reseed the kernel RNG");
        if (fd >= 0) close(fd);
        memset(&rp, 0, sizeof rp);
        if (rc) return -1;
    }
    return 0;
}

static int write_str(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    int e = errno;
    close(fd);
    errno = e;
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* A fractional --cpus becomes a CFS quota on a cgroup that PID 1 joins, so every exec inherits
 * it. The cgroup tree is then left read-only in the guest: without CAP_SYS_ADMIN an exec
 * cannot remount it to lift its own limit. */
static int limit_cpu(uint32_t quota_us)
{
    char buf[32];
    if (mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
        return fail("mount cgroup2 on /sys/fs/cgroup");
    if (write_str("/sys/fs/cgroup/cgroup.subtree_control", "+cpu"))
        return fail("enable the cpu controller");
    if (mkdir_ok("/sys/fs/cgroup/sandbox", 0755)) return fail("mkdir /sys/fs/cgroup/sandbox");
    snprintf(buf, sizeof buf, "%u 100000", quota_us);
    if (write_str("/sys/fs/cgroup/sandbox/cpu.max", buf)) return fail("write cpu.max");
    if (write_str("/sys/fs/cgroup/sandbox/cgroup.procs", "0"))
        return fail("move the agent into the sandbox cgroup");
    if (mount(NULL, "/sys/fs/cgroup", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID |
              MS_NODEV | MS_NOEXEC, NULL))
        return fail("make /sys/fs/cgroup read-only");
    return 0;
}

static void sockaddr_v4(struct sockaddr *sa, uint32_t addr)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(addr)};
    memcpy(sa, &sin, sizeof sin);
}

static int if_set(int fd, const char *name, unsigned long req, uint32_t addr)
{
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    sockaddr_v4(&ifr.ifr_addr, addr);
    return ioctl(fd, req, &ifr);
}

static int if_up(int fd, const char *name, uint32_t mtu)
{
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    if (mtu) {
        ifr.ifr_mtu = (int)mtu;
        if (ioctl(fd, SIOCSIFMTU, &ifr)) return -1;
    }
    if (ioctl(fd, SIOCGIFFLAGS, &ifr)) return -1;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    return ioctl(fd, SIOCSIFFLAGS, &ifr);
}

/* What configure_net did (PREPARE in an image template, or SETUP). */
static bool g_net_done;
static struct {
    bool have;
    uint32_t addr, gw, mtu;
    uint8_t prefix;
} g_net;

/* Loopback always; eth0 only when the host gave the VM a NIC. The host is the only peer
 * (its namespace routes nowhere), so a static address and one default route are all it takes.
 * Every sandbox has the same addresses and MACs (net/addressing.py), so PREPARE (given NET)
 * configures them in an image template, and a clone's SETUP finds them done: bringing eth0
 * up (rx buffers, the device's queues) is kernel code TCG would translate again after every
 * restore. A SETUP whose NET differs from PREPARE's is refused rather than patched up. */
static int configure_net(const struct setup *s)
{
    if (g_net_done) {
        if (s->have_net == g_net.have &&
            (!s->have_net || (s->net_addr == g_net.addr && s->net_gw == g_net.gw &&
                              s->net_mtu == g_net.mtu && s->net_prefix == g_net.prefix)))
            return 0;
        errno = EINVAL;
        return fail("SETUP: NET differs from the one PREPARE configured");
    }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail("socket");
    int rc = 0;
    if (if_up(fd, "lo", 0)) rc = fail("bring up lo");
    if (rc == 0 && s->have_net) {
        uint32_t mask = s->net_prefix ? ~0u << (32 - s->net_prefix) : 0;
        if (if_set(fd, "eth0", SIOCSIFADDR, s->net_addr)) rc = fail("set the address of eth0");
        else if (if_set(fd, "eth0", SIOCSIFNETMASK, mask)) rc = fail("set the netmask of eth0");
        else if (if_up(fd, "eth0", s->net_mtu)) rc = fail("bring up eth0");
        else {
            struct rtentry rt = {0};
            sockaddr_v4(&rt.rt_dst, 0);
            sockaddr_v4(&rt.rt_genmask, 0);
            sockaddr_v4(&rt.rt_gateway, s->net_gw);
            rt.rt_flags = RTF_UP | RTF_GATEWAY;
            if (ioctl(fd, SIOCADDRT, &rt)) rc = fail("add the default route");
        }
    }
    close(fd);
    if (rc == 0) {
        g_net_done = true;
        g_net.have = s->have_net;
        g_net.addr = s->net_addr;
        g_net.gw = s->net_gw;
        g_net.mtu = s->net_mtu;
        g_net.prefix = s->net_prefix;
    }
    return rc;
}

/* Absolute, no empty, "." or ".." component, not / itself, not under /proc, /sys or /dev. */
static bool valid_share_path(const char *p)
{
    if (p[0] != '/' || !p[1] || strlen(p) > 4000) return false;
    const char *reserved[] = {"/proc", "/sys", "/dev"};
    for (size_t i = 0; i < 3; i++) {
        size_t n = strlen(reserved[i]);
        if (!strncmp(p, reserved[i], n) && (p[n] == 0 || p[n] == '/')) return false;
    }
    for (const char *c = p; *c;) {
        c++; /* past '/' */
        const char *e = strchr(c, '/');
        size_t n = e ? (size_t)(e - c) : strlen(c);
        if (n == 0 || (n == 1 && c[0] == '.') || (n == 2 && c[0] == '.' && c[1] == '.'))
            return false;
        c += n;
    }
    return true;
}

/* Open (creating what is missing) the mount point for a share under the new root, one
 * component at a time: a symlink in the image (/workspace -> /etc) is refused, never
 * followed. Returns an fd (O_PATH directory, or the file) or -1. */
static int share_target(const char *path, bool file)
{
    char *copy = strdup(path);
    if (!copy) return fail("mount point %s", path);
    int dir = open("/mnt/root", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) fail("open /mnt/root");
    char *save = NULL, *next;
    for (char *c = strtok_r(copy, "/", &save); c && dir >= 0; c = next) {
        next = strtok_r(NULL, "/", &save);
        int fd = -1;
        if (next || !file) {
            if (mkdirat(dir, c, 0755) && errno != EEXIST)
                fail("create the mount point %s (at %s)", path, c);
            else if ((fd = openat(dir, c, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0)
                fail("mount point %s: %s is not a directory", path, c);
        } else {
            struct stat st;
            fd = openat(dir, c, O_RDONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0644);
            if (fd < 0) {
                fail("mount point %s is not a regular file", path);
            } else if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
                close(fd);
                fd = -1;
                errno = EINVAL;
                fail("mount point %s is not a regular file", path);
            }
        }
        close(dir);
        dir = fd;
    }
    free(copy);
    return dir;
}

static int copy_file(const char *from, const char *to)
{
    int in = open(from, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (in < 0) return fail("open %s", from);
    struct stat st;
    int out = -1, rc = -1;
    if (fstat(in, &st)) fail("stat %s", from);
    else if ((out = open(to, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                         st.st_mode & 07777)) < 0)
        fail("create %s", to);
    else {
        static char buf[65536];
        ssize_t n;
        rc = 0;
        while (rc == 0 && (n = read(in, buf, sizeof buf)) != 0) {
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 || write(out, buf, (size_t)n) != n) rc = fail("copy %s", from);
        }
        if (rc == 0 && fchmod(out, st.st_mode & 07777)) rc = fail("chmod %s", to);
    }
    close(in);
    if (out >= 0 && close(out) && rc == 0) rc = fail("write %s", to);
    return rc;
}

/* The two 9p exports are mounted (once, when used) at /mnt/shares/ml0 (read-only) and
 * /mnt/shares/ml1; each host path is one entry in them. An overlay entry gets an overlayfs
 * (or, for a file, a copy) whose writes go to the sandbox's writable layer. Then a bind mount
 * at the guest path, all before the switch to the new root (they move with it). */
static int mount_shares(const struct setup *s)
{
    bool mounted[2] = {false, false};
    if (s->nshares && (mkdir_ok("/mnt/upperfs/shares", 0700) || mkdir_ok("/mnt/shares", 0700)))
        return fail("mkdir for shares");
    for (size_t i = 0; i < s->nshares; i++) {
        const struct share *sh = &s->shares[i];
        char share[64], src[128], dir[96], upper[128], work[128], opts[512];
        unsigned long ro = sh->share == 0 ? MS_RDONLY : 0;        /* the 9p mount */
        unsigned long bind_ro = sh->mode == SHARE_RO ? MS_RDONLY : 0; /* the guest path */
        snprintf(share, sizeof share, "/mnt/shares/ml%u", sh->share);
        if (!mounted[sh->share]) {
            if (mkdir_ok(share, 0700)) return fail("mkdir %s", share);
            if (mount(share + 12, share, "9p", MS_NOSUID | MS_NODEV | ro,
                      "trans=virtio,version=9p2000.L,msize=512000"))
                return fail("mount the host share %s (9p)", share + 12);
            mounted[sh->share] = true;
        }
        snprintf(src, sizeof src, "%s/%u", share, sh->entry);
        if (sh->mode == SHARE_OVERLAY) {
            snprintf(dir, sizeof dir, "/mnt/upperfs/shares/%u", sh->entry);
            if (mkdir_ok(dir, 0700)) return fail("mkdir %s", dir);
            if (sh->kind == SHARE_FILE) {
                snprintf(upper, sizeof upper, "%s/file", dir);
                if (copy_file(src, upper)) return -1;
                snprintf(src, sizeof src, "%s", upper);
            } else {
                snprintf(upper, sizeof upper, "%s/upper", dir);
                snprintf(work, sizeof work, "%s/work", dir);
                if (mkdir_ok(upper, 0755) || mkdir_ok(work, 0700))
                    return fail("mkdir %s/{upper,work}", dir);
                /* The upper's root takes the lower's owner and mode (as a copy would). */
                struct stat st;
                if (stat(src, &st) == 0 &&
                    (chmod(upper, st.st_mode & 07777) || chown(upper, st.st_uid, st.st_gid)))
                    return fail("set the owner and mode of %s", upper);
                snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s", src, upper,
                         work);
                snprintf(src, sizeof src, "/mnt/shares/o%u", sh->entry);
                if (mkdir_ok(src, 0700) ||
                    mount("overlay", src, "overlay", MS_NOSUID | MS_NODEV, opts))
                    return fail("mount the overlay for %s", sh->path);
            }
        }
        int fd = share_target(sh->path, sh->kind == SHARE_FILE);
        if (fd < 0) return -1;
        char target[64];
        snprintf(target, sizeof target, "/proc/self/fd/%d", fd);
        int rc = mount(src, target, NULL, MS_BIND, NULL);
        close(fd);
        if (rc) return fail("bind the share at %s", sh->path);
        /* The bind inherits the source's flags; say them again (ro stays ro). */
        char guest[4200];
        snprintf(guest, sizeof guest, "/mnt/root%s", sh->path);
        if (mount(NULL, guest, NULL, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | bind_ro, NULL))
            return fail("remount the share at %s", sh->path);
    }
    return 0;
}

/* The block device (vdX) whose virtio serial is mlvol<slot>: device names follow probe
 * order, the serial is what the host set. */
static int find_disk(uint8_t slot, char *dev, size_t len)
{
    char want[16], path[96], got[32];
    snprintf(want, sizeof want, "mlvol%u", slot);
    DIR *d = opendir("/sys/block");
    if (!d) return fail("open /sys/block");
    struct dirent *e;
    int rc = -1;
    while (rc && (e = readdir(d))) {
        if (strncmp(e->d_name, "vd", 2) || strlen(e->d_name) > 16) continue;
        snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, got, sizeof got - 1);
        close(fd);
        if (n <= 0) continue;
        got[n] = 0;
        got[strcspn(got, "\n")] = 0;
        if (!strcmp(got, want)) {
            snprintf(dev, len, "/dev/%s", e->d_name);
            rc = 0;
        }
    }
    closedir(d);
    if (rc) {
        errno = ENODEV;
        fail("no disk with serial %s", want);
    }
    return rc;
}

/* Each extra disk is mounted (ext4, nosuid, nodev) on its mount point under the new root,
 * created if missing and never through a symlink of the image. The file system was written
 * by earlier guests: only this guest's kernel ever parses it. */
static int mount_disks(const struct setup *s)
{
    for (size_t i = 0; i < s->ndisks; i++) {
        const struct disk *dk = &s->disks[i];
        char dev[48], target[64];
        if (find_disk(dk->slot, dev, sizeof dev)) return -1;
        flush_block_cache(dev); /* a restored VM probed a placeholder there */
        int fd = share_target(dk->path, false);
        if (fd < 0) return -1;
        snprintf(target, sizeof target, "/proc/self/fd/%d", fd);
        unsigned long flags = MS_NOSUID | MS_NODEV | (dk->flags & DISK_RO ? MS_RDONLY : 0);
        int rc = mount(dev, target, "ext4", flags, "noinit_itable");
        if (rc && (dk->flags & DISK_RO))
            /* Not shut down cleanly (a killed sandbox): the journal cannot be replayed on a
             * read-only device; show the last checkpointed state. */
            rc = mount(dev, target, "ext4", flags, "noinit_itable,norecovery");
        close(fd);
        if (rc) return fail("mount the disk %s (ext4) at %s", dev, dk->path);
        if (g_ndisks < MAX_DISKS && (g_disk_paths[g_ndisks] = strdup(dk->path))) g_ndisks++;
    }
    return 0;
}

/* Parse the SETUP TLV; on error s_err/s_msg say why. */
static int parse_setup(const uint8_t *p, size_t n, struct setup *s)
{
    struct tlv t = {p, n, 0};
    struct tlv_field f;
    int r;
    errno = EINVAL;
    while ((r = tlv_next(&t, &f)) > 0) {
        char **dst = NULL;
        switch (f.tag) {
        case SETUP_HOSTNAME: dst = &s->hostname; break;
        case SETUP_ROOT_DEV: dst = &s->root_dev; break;
        case SETUP_UPPER_DEV: dst = &s->upper_dev; break;
        case SETUP_RESOLV: dst = &s->resolv; break;
        case SETUP_CLOCK_NS:
            if (f.len != 8) return fail("SETUP: CLOCK_NS must be 8 bytes");
            s->clock_ns = get_be64(f.val);
            s->have_clock = true;
            break;
        case SETUP_ENTROPY:
            if (f.len < 32 || f.len > 256) return fail("SETUP: ENTROPY must be 32 to 256 bytes");
            s->entropy = f.val;
            s->entropy_len = f.len;
            break;
        case SETUP_CPU_QUOTA:
            if (f.len != 4) return fail("SETUP: CPU_QUOTA must be 4 bytes");
            s->cpu_quota_us = get_be32(f.val);
            if (s->cpu_quota_us < 1000) return fail("SETUP: CPU_QUOTA below 1000 us");
            break;
        case SETUP_NET:
            if (f.len != 13) return fail("SETUP: NET must be 13 bytes");
            s->net_addr = get_be32(f.val);
            s->net_prefix = f.val[4];
            s->net_gw = get_be32(f.val + 5);
            s->net_mtu = get_be32(f.val + 9);
            if (s->net_prefix < 1 || s->net_prefix > 30 || s->net_mtu < 576 || s->net_mtu > 65535)
                return fail("SETUP: NET prefix or MTU out of range");
            s->have_net = true;
            break;
        case SETUP_MOUNT: {
            if (s->nshares == MAX_SHARES) return fail("SETUP: too many MOUNTs");
            if (f.len < 6 || f.len > 4100) return fail("SETUP: bad MOUNT length");
            struct share *sh = &s->shares[s->nshares];
            sh->share = f.val[0];
            sh->mode = f.val[1];
            sh->kind = f.val[2];
            sh->entry = f.val[3];
            struct tlv_field pf = {.tag = f.tag, .len = f.len - 4, .val = f.val + 4};
            if (!(sh->path = tlv_strdup(&pf))) return fail("SETUP: bad MOUNT path");
            s->nshares++;
            /* host_fs entries live on the read-write share, the others on the read-only one */
            if (sh->share != (sh->mode == SHARE_HOST_FS) || sh->mode > SHARE_HOST_FS ||
                sh->kind > SHARE_FILE || sh->entry >= MAX_SHARES || !valid_share_path(sh->path))
                return fail("SETUP: bad MOUNT (share, mode, kind, entry or path)");
            for (size_t i = 0; i + 1 < s->nshares; i++)
                if (s->shares[i].entry == sh->entry) return fail("SETUP: MOUNT entry used twice");
            break;
        }
        case SETUP_DISK: {
            if (s->ndisks == MAX_DISKS) return fail("SETUP: too many DISKs");
            if (f.len < 4 || f.len > 4100) return fail("SETUP: bad DISK length");
            struct disk *dk = &s->disks[s->ndisks];
            dk->slot = f.val[0];
            dk->flags = f.val[1];
            struct tlv_field pf = {.tag = f.tag, .len = f.len - 2, .val = f.val + 2};
            if (!(dk->path = tlv_strdup(&pf))) return fail("SETUP: bad DISK path");
            s->ndisks++;
            if (dk->slot >= MAX_DISKS || (dk->flags & ~DISK_RO) || !valid_share_path(dk->path))
                return fail("SETUP: bad DISK (slot, flags or path)");
            for (size_t i = 0; i + 1 < s->ndisks; i++)
                if (s->disks[i].slot == dk->slot) return fail("SETUP: DISK slot used twice");
            break;
        }
        case SETUP_CA:
            if (f.len > 65536 || memchr(f.val, 0, f.len))
                return fail("SETUP: CA must be at most 65536 bytes of text");
            s->ca = (const char *)f.val;
            s->ca_len = f.len;
            break;
        case SETUP_HOSTS_LINE: {
            char **h = realloc(s->hosts, (s->nhosts + 1) * sizeof *h);
            if (!h) return fail("SETUP");
            s->hosts = h;
            if (!(h[s->nhosts] = tlv_strdup(&f))) return fail("SETUP: bad HOSTS_LINE");
            s->nhosts++;
            break;
        }
        case SETUP_WARM_ARG:
            if (s->nwarm == MAX_WARM_ARGS) return fail("PREPARE: too many WARM_ARGs");
            if (!f.len || f.len > 1024 || !(s->warm[s->nwarm] = tlv_strdup(&f)))
                return fail("PREPARE: bad WARM_ARG");
            s->nwarm++;
            break;
        default: break; /* unknown tags: forward compatibility */
        }
        if (dst) {
            free(*dst);
            if (!(*dst = tlv_strdup(&f))) return fail("SETUP: bad string field %u", f.tag);
        }
        errno = EINVAL;
    }
    if (r < 0) return fail("SETUP: malformed TLV");
    if (g_prepared) {
        if (s->root_dev || s->upper_dev || s->nshares || s->ndisks)
            return fail("SETUP: ROOT_DEV, UPPER_DEV, MOUNT and DISK are refused after PREPARE");
    } else if (!s->root_dev || !valid_dev_name(s->root_dev)) {
        return fail("SETUP: ROOT_DEV missing or not a device name");
    }
    if (s->nwarm && g_setup_done) return fail("SETUP: WARM_ARG belongs to PREPARE");
    if (s->upper_dev && !valid_dev_name(s->upper_dev))
        return fail("SETUP: UPPER_DEV is not a device name");
    if (s->hostname && (!*s->hostname || strlen(s->hostname) > 64 || strchr(s->hostname, '\n')))
        return fail("SETUP: bad HOSTNAME");
    return 0;
}

static void free_setup(struct setup *s)
{
    free(s->hostname);
    free(s->root_dev);
    free(s->upper_dev);
    free(s->resolv);
    for (size_t i = 0; i < s->nhosts; i++) free(s->hosts[i]);
    free(s->hosts);
    for (size_t i = 0; i < s->nwarm; i++) free(s->warm[i]);
    for (size_t i = 0; i < s->nshares; i++) free(s->shares[i].path);
    for (size_t i = 0; i < s->ndisks; i++) free(s->disks[i].path);
}

/* Files nearly every first exec reads (the agent's user lookup, the shell and the usual ELF
 * loaders): read once in an image template, they are in the page cache of every clone instead
 * of emulated disk reads on its first exec. Regular files only (never a FIFO or a device of a
 * hostile image), at most 16 MiB each; missing ones are skipped. */
static void warm_page_cache(void)
{
    static const char *const files[] = {
        "/etc/passwd", "/etc/group", "/bin/sh", "/lib/ld-musl-x86_64.so.1",
        "/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6",
    };
    static char buf[65536];
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        struct stat st;
        if (stat(files[i], &st) || !S_ISREG(st.st_mode) || st.st_size > (16 << 20)) continue;
        int fd = open(files[i], O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (fd < 0) continue;
        for (off_t left = st.st_size; left > 0;) {
            ssize_t n = read(fd, buf, sizeof buf);
            if (n <= 0) break;
            left -= n;
        }
        close(fd);
    }
}

/* PREPARE: what every sandbox of one image does first, so that an image template can hold it
 * done: the root switch (ROOT_DEV, UPPER_DEV; no MOUNT or DISK), /dev, and the sandbox init.
 * Nothing here is per sandbox: SETUP follows after each restore (clock, RNG reseed, identity,
 * network). */
void handle_prepare(const uint8_t *p, size_t n)
{
    static bool done;
    if (done || g_setup_done) {
        send_result(0, EALREADY, "PREPARE must come once, before SETUP");
        return;
    }
    done = true; /* one attempt, as for SETUP */
    if (g_stdio) {
        send_result(0, 0, "%s", "");
        return;
    }
    struct setup s = {0};
    s_err = 0;
    int rc = parse_setup(p, n, &s);
    if (rc == 0 && (s.nshares || s.ndisks)) {
        errno = EINVAL;
        rc = fail("PREPARE: MOUNT and DISK belong to SETUP");
    }
    /* The clock first: a restored generic template's clock is that of its save, and the
     * directories PREPARE creates (or changes) keep their times in every clone. */
    if (rc == 0 && s.entropy_len) {
        errno = EINVAL;
        rc = fail("PREPARE: ENTROPY belongs to SETUP");
    }
    if (rc == 0) rc = set_clock_and_entropy(&s);
    if (rc == 0) rc = switch_root(&s);
    if (rc == 0) rc = mount_guest_dev();
    if (rc == 0) {
        char why[200];
        if (sandbox_ensure(why, sizeof why)) {
            errno = EIO;
            rc = fail("%s", why);
        }
    }
    if (rc == 0 && s.nwarm) {
        char why[200];
        if (sandbox_warm(s.warm, WARM_TIMEOUT_MS, why, sizeof why)) {
            errno = EIO;
            rc = fail("%s", why);
        }
    }
    if (rc == 0) rc = prepare_files(&s);
    if (rc == 0) rc = configure_net(&s);
    if (rc == 0) warm_page_cache();
    if (rc == 0) {
        /* Nothing dirty in the template: a clone's first seconds are not the writeback of
         * what the template wrote (the overlay's work directories). */
        sync();
        g_prepared = true;
        send_result(0, 0, "%s", "");
    } else {
        send_result(0, s_err, "%s", s_msg);
    }
    free_setup(&s);
}

void handle_setup(const uint8_t *p, size_t n)
{
    if (g_setup_done) {
        send_result(0, EALREADY, "SETUP was already done");
        return;
    }
    /* One attempt only: after a failure half of the mounts may be in place, and the host
     * shuts the VM down anyway. */
    g_setup_done = true;
    if (g_stdio) { /* test mode: the host's own root stays as it is */
        g_setup_ok = true;
        send_result(0, 0, "%s", "");
        return;
    }
    struct setup s = {0};
    s_err = 0;
    int rc = parse_setup(p, n, &s);
    if (rc == 0) rc = set_clock_and_entropy(&s);
    if (rc == 0 && !g_prepared) rc = switch_root(&s);
    if (rc == 0 && !g_prepared) rc = mount_guest_dev();
    if (rc == 0) rc = set_identity(&s);
    if (rc == 0) rc = install_ca(&s);
    if (rc == 0 && s.cpu_quota_us) {
        rc = limit_cpu(s.cpu_quota_us);
        /* A prepared sandbox init copied the mounts before the cgroup tree existed: the first
         * exec starts a new one that sees it (read-only). */
        sandbox_drop();
    }
    if (rc == 0) rc = configure_net(&s);
    g_setup_ok = rc == 0;
    if (rc == 0) send_result(0, 0, "%s", "");
    else send_result(0, s_err, "%s", s_msg);
    free_setup(&s);
}

/* CA: the sandbox CA, when it was not ready for SETUP (the host's proxy makes it while the
 * guest restores): a TLV with SETUP's CA field alone, once, after a successful SETUP without
 * one. The host sends it right behind SETUP, without waiting for SETUP's RESULT. */
void handle_ca(const uint8_t *p, size_t n)
{
    if (!g_setup_ok || g_ca_done) {
        send_result(0, EALREADY, "CA must come once, after a successful SETUP without CA");
        return;
    }
    struct setup s = {0};
    struct tlv t = {p, n, 0};
    struct tlv_field f;
    int r = 0, rc = 0;
    s_err = 0;
    errno = EINVAL;
    while (rc == 0 && (r = tlv_next(&t, &f)) > 0) {
        if (f.tag != SETUP_CA || s.ca || f.len == 0 || f.len > 65536 || memchr(f.val, 0, f.len))
            rc = fail("CA: bad field %u (%u bytes)", f.tag, f.len);
        s.ca = (const char *)f.val;
        s.ca_len = f.len;
    }
    if (rc == 0 && (r < 0 || !s.ca)) rc = fail("CA: malformed or without CA");
    if (rc == 0 && g_stdio) g_ca_done = true; /* test mode: no files of the host's touched */
    else if (rc == 0) rc = install_ca(&s);
    if (rc == 0) send_result(0, 0, "%s", "");
    else send_result(0, s_err, "%s", s_msg);
}

/* RESUME: the host paused this VM (a warm pool member) and resumed it. The guest clock stood
 * still meanwhile, so the wall clock is set again; fresh entropy is mixed in as at SETUP.
 * Only CLOCK_NS (required) and ENTROPY are accepted. */
void handle_resume(const uint8_t *p, size_t n)
{
    struct setup s = {0};
    struct tlv t = {p, n, 0};
    struct tlv_field f;
    int r = 0, rc = 0;
    s_err = 0;
    errno = EINVAL;
    while (rc == 0 && (r = tlv_next(&t, &f)) > 0) {
        if (f.tag == SETUP_CLOCK_NS && f.len == 8) {
            s.clock_ns = get_be64(f.val);
            s.have_clock = true;
        } else if (f.tag == SETUP_ENTROPY && f.len >= 32 && f.len <= 256) {
            s.entropy = f.val;
            s.entropy_len = f.len;
        } else {
            rc = fail("RESUME: bad field %u (%u bytes)", f.tag, f.len);
        }
    }
    if (rc == 0 && (r < 0 || !s.have_clock)) rc = fail("RESUME: malformed or without CLOCK_NS");
    if (rc == 0 && !g_stdio) rc = set_clock_and_entropy(&s);
    if (rc == 0) send_result(0, 0, "%s", "");
    else send_result(0, s_err, "%s", s_msg);
}
