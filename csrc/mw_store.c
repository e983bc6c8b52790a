/* mw_store — directory of pprof files; see mw_store.h for the contract. */
#define _GNU_SOURCE
#include "mw_store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SUFFIX ".pb.gz"
#define SUFFIX_LEN 6
#define TMP_SUFFIX ".pb.gz.tmp"
#define TMP_SUFFIX_LEN 10

void mw_store_sanitize_service(const char *service, char *out, size_t cap) {
    size_t max = cap - 1 < MW_STORE_SERVICE_MAX ? cap - 1 : MW_STORE_SERVICE_MAX, k = 0;
    for (const char *c = service ? service : ""; *c && k < max; c++) {
        int ok = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
                 *c == '-' || *c == '_' || (*c == '.' && k > 0);
        out[k++] = ok ? *c : '_';
    }
    out[k] = '\0';
    if (k == 0) snprintf(out, cap, "python");
}

/* Parses "-<digits>" ending at end (exclusive); returns the position of the '-' or NULL. */
static const char *digits_back(const char *begin, const char *end, int max_digits, int64_t *v) {
    const char *p = end;
    while (p > begin && p[-1] >= '0' && p[-1] <= '9')
        p--;
    long n = end - p;
    if (n < 1 || n > max_digits || p == begin || p[-1] != '-') return NULL;
    int64_t x = 0;
    for (const char *q = p; q < end; q++)
        x = x * 10 + (*q - '0');
    *v = x;
    return p - 1;
}

int mw_store_parse_name(const char *name, int64_t *start_ms) {
    size_t len = strlen(name);
    if (name[0] == '.' || len <= SUFFIX_LEN || strcmp(name + len - SUFFIX_LEN, SUFFIX) != 0)
        return 0;
    const char *end = name + len - SUFFIX_LEN;
    int64_t ms, pid;
    const char *dash = digits_back(name, end, 18, &ms);
    if (!dash) return 0;
    dash = digits_back(name, dash, 10, &pid);
    if (!dash || dash == name) return 0; /* a non-empty service before "-<pid>" */
    if (start_ms) *start_ms = ms;
    return 1;
}

/* mkdir -p */
static int make_dirs(const char *dir) {
    char p[4096];
    size_t n = strlen(dir);
    if (n == 0 || n >= sizeof p) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(p, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (p[i] != '/' && p[i] != '\0') continue;
        char c = p[i];
        p[i] = '\0';
        if (mkdir(p, 0777) != 0 && errno != EEXIST) return -1;
        p[i] = c;
    }
    return 0;
}

static int write_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

typedef struct {
    int64_t ms;
    uint64_t size;
    char name[256];
} entry_t;

static int entry_cmp(const void *a, const void *b) {
    const entry_t *x = a, *y = b;
    if (x->ms != y->ms) return x->ms < y->ms ? -1 : 1;
    return strcmp(x->name, y->name);
}

int mw_store_evict(const char *dir, uint64_t max_bytes, const char *keep_name,
                   mw_store_result_t *res) {
    if (max_bytes == 0) max_bytes = MW_STORE_DEFAULT_MAX_BYTES;
    DIR *d = opendir(dir);
    if (!d) {
        if (!res->err) res->err = errno;
        if (!res->failed) res->failed = "scan";
        return -1;
    }
    int dfd = dirfd(d);
    entry_t *ents = NULL;
    size_t n = 0, cap = 0;
    uint64_t total = 0;
    time_t now = time(NULL);
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        const char *nm = de->d_name;
        size_t len = strlen(nm);
        struct stat st;
        if (nm[0] == '.' && len > TMP_SUFFIX_LEN &&
            strcmp(nm + len - TMP_SUFFIX_LEN, TMP_SUFFIX) == 0) {
            /* A temporary file; stale ones are left-overs of a crashed writer. */
            if (fstatat(dfd, nm, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) &&
                now - st.st_mtime > MW_STORE_STALE_TMP_S)
                unlinkat(dfd, nm, 0);
            continue;
        }
        int64_t ms;
        if (len >= sizeof ents->name || !mw_store_parse_name(nm, &ms)) continue;
        if (fstatat(dfd, nm, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) continue;
        if (n == cap) {
            size_t nc = cap ? 2 * cap : 256;
            entry_t *ne = realloc(ents, nc * sizeof *ents);
            if (!ne) break; /* evict among what we have seen */
            ents = ne;
            cap = nc;
        }
        ents[n].ms = ms;
        ents[n].size = (uint64_t)st.st_size;
        memcpy(ents[n].name, nm, len + 1);
        total += ents[n].size;
        n++;
    }
    size_t left = n;
    if (total > max_bytes && n > 0) {
        qsort(ents, n, sizeof *ents, entry_cmp);
        for (size_t i = 0; i < n && total > max_bytes; i++) {
            if (keep_name && strcmp(ents[i].name, keep_name) == 0) continue;
            if (unlinkat(dfd, ents[i].name, 0) == 0) {
                res->files_evicted++;
                res->bytes_evicted += ents[i].size;
            } else if (errno != ENOENT) {
                continue; /* cannot remove it: still there, still counted */
            }
            total -= ents[i].size; /* removed, by us or by another process */
            left--;
        }
    }
    res->dir_bytes = total;
    res->dir_files = (uint32_t)left;
    free(ents);
    closedir(d);
    return 0;
}

int mw_store_write(const char *dir, const char *service, long pid, int64_t start_ms,
                   const void *data, size_t len, uint64_t max_bytes, mw_store_result_t *res) {
    memset(res, 0, sizeof *res);
    char name[256], tmp[4096];
    struct stat st;
    int n = 0;
    for (int tries = 0; tries < 1000; tries++, start_ms++) {
        snprintf(name, sizeof name, "%s-%ld-%lld" SUFFIX, service, pid, (long long)start_ms);
        n = snprintf(res->path, sizeof res->path, "%s/%s", dir, name);
        if (n < 0 || (size_t)n >= sizeof res->path) {
            res->err = ENAMETOOLONG;
            break;
        }
        if (stat(res->path, &st) != 0) break; /* free (or unreachable: open says why) */
    }
    n = res->err ? -1 : snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        res->err = ENAMETOOLONG;
        res->failed = "open";
        res->path[0] = '\0';
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 && errno == ENOENT && make_dirs(dir) == 0)
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        res->err = errno;
        res->failed = "open";
        res->path[0] = '\0';
        return -1;
    }
    int wrc = write_all(fd, data, len);
    int werr = errno;
    if (close(fd) != 0 && wrc == 0) {
        wrc = -1;
        werr = errno;
    }
    if (wrc != 0 || rename(tmp, res->path) != 0) {
        res->err = wrc != 0 ? werr : errno;
        res->failed = wrc != 0 ? "write" : "rename";
        unlink(tmp);
        res->path[0] = '\0';
        return -1;
    }
    res->bytes_written = len;
    mw_store_evict(dir, max_bytes, name, res);
    return 0;
}
