/* Unit tests of the pure C parts, linked straight against their sources (no Python):
 *   test_c_units profbuf    the profile buffer's tables at and past their limits
 *   test_c_units json       reading the tenant exchange's answer (mw_upload_json, json-c)
 *   test_c_units corrupt    line-table decoding of corrupt tables (random bytes, cut varints)
 *   test_c_units threads    thread names: forgotten threads keep theirs through one reap
 *   test_c_units steal      a perf count read less the host's steal (readings of count, clock)
 *   test_c_units backlog    profiles waiting for room in the store: the bound, the order, a fork
 *   test_c_units linetable  line-table decoding; cases on stdin, one code object a line:
 *                           "<format> <firstlineno> <ncodeunits> <table hex|-> <line,line,...>"
 *                           where line i is the line CPython itself gives code unit i.
 * Each prints "<part>: <n> checks, <m> failed" and exits 1 when a check failed. Every input
 * is copied into a buffer of exactly its size, so a read past the end is caught under ASan.
 */
#include "mw_backlog.h"
#include "mw_cpusteal.h"
#include "mw_labels.h"
#include "mw_linetable.h"
#include "mw_profbuf.h"
#include "mw_upload_json.h"
#include "mw_termguard.h"
#include "mw_threads.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static long g_checks, g_failed;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        g_checks++;                                                                                \
        if (!(cond)) {                                                                             \
            g_failed++;                                                                            \
            if (g_failed <= 50) fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                                          \
    } while (0)

/* A heap copy of exactly n bytes (at least one allocated byte, never read when n == 0). */
static void *exact_copy(const void *p, size_t n) {
    void *c = malloc(n ? n : 1);
    if (!c) abort();
    if (n) memcpy(c, p, n);
    return c;
}

/* ---- profbuf ------------------------------------------------------------------------------ */

static mw_profbuf_t *new_buf(uint32_t stacks, uint32_t frames, uint32_t strings, uint32_t bytes,
                             uint32_t slots) {
    mw_profbuf_limits_t lim = {stacks, frames, strings, bytes, slots};
    mw_profbuf_t *b = mw_profbuf_new(&lim);
    if (!b) abort();
    return b;
}

static int str_is(const mw_profbuf_t *b, mw_id_t id, const char *want) {
    size_t len = 0;
    const char *s = mw_profbuf_str(b, id, &len);
    return s && len == strlen(want) && memcmp(s, want, len) == 0 && s[len] == '\0';
}

static void profbuf_strings(void) {
    /* the string count limit: the fifth distinct string is refused, known ones still resolve */
    mw_profbuf_t *b = new_buf(4, 4, 4, 1024, 16);
    const char *names[] = {"alpha", "beta", "gamma", "delta"};
    for (int i = 0; i < 4; i++)
        CHECK(mw_profbuf_intern_str(b, names[i], strlen(names[i])) == (mw_id_t)(i + 1));
    CHECK(mw_profbuf_intern_str(b, "beta", 4) == 2);
    CHECK(mw_profbuf_intern_str(b, "epsilon", 7) == 0);
    CHECK(mw_profbuf_intern_str(b, "zeta", 4) == 0);
    mw_profbuf_counts_t c;
    mw_profbuf_counts(b, &c);
    CHECK(c.strings == 4 && c.overflow == 2);
    CHECK(c.string_bytes_used == 6 + 5 + 6 + 6);
    for (int i = 0; i < 4; i++)
        CHECK(str_is(b, (mw_id_t)(i + 1), names[i]));
    CHECK(mw_profbuf_str(b, 0, NULL) == NULL && mw_profbuf_str(b, 5, NULL) == NULL);
    mw_profbuf_free(b);

    /* the arena limit, to the byte: 11 + 5 bytes fill 16 exactly, one more byte does not fit */
    b = new_buf(4, 4, 100, 16, 16);
    CHECK(mw_profbuf_intern_str(b, "0123456789", 10) == 1);
    CHECK(mw_profbuf_intern_str(b, "abcde", 5) == 0);
    CHECK(mw_profbuf_intern_str(b, "abcd", 4) == 2);
    CHECK(mw_profbuf_intern_str(b, "", 0) == 0);
    mw_profbuf_counts(b, &c);
    CHECK(c.string_bytes_used == 16 && c.strings == 2 && c.overflow == 2);
    CHECK(str_is(b, 1, "0123456789") && str_is(b, 2, "abcd"));
    mw_profbuf_free(b);

    /* strings longer than 65535 bytes are cut to 65535; the cut copy is NUL-terminated */
    size_t big = 70000;
    char *s = malloc(big);
    if (!s) abort();
    memset(s, 'x', big);
    b = new_buf(4, 4, 4, 1 << 17, 16);
    mw_id_t id = mw_profbuf_intern_str(b, s, big);
    size_t len = 0;
    const char *got = mw_profbuf_str(b, id, &len);
    CHECK(id == 1 && got && len == 0xFFFF && got[len] == '\0' && got[len - 1] == 'x');
    CHECK(mw_profbuf_intern_str(b, s, 0xFFFF) == 1);
    free(s);
    mw_profbuf_free(b);

    /* a renamed string: its id gives the new text, interning the new text finds that id, the old
     * text is a new string; a rename takes a string's room, and refused ones change nothing */
    b = new_buf(4, 4, 4, 64, 16);
    mw_id_t ph = mw_profbuf_intern_str(b, "thread-42", 9);
    CHECK(mw_profbuf_rename_str(b, ph, "worker-1", 8) == 0);
    CHECK(str_is(b, ph, "worker-1"));
    CHECK(mw_profbuf_intern_str(b, "worker-1", 8) == ph);
    mw_id_t again = mw_profbuf_intern_str(b, "thread-42", 9);
    CHECK(again == ph + 1 && str_is(b, again, "thread-42"));
    CHECK(mw_profbuf_rename_str(b, 0, "x", 1) == -1 && mw_profbuf_rename_str(b, 9, "x", 1) == -1);
    CHECK(mw_profbuf_intern_str(b, "c", 1) == 3);
    CHECK(mw_profbuf_rename_str(b, again, "y", 1) == -1); /* 3 strings + 1 rename: full */
    CHECK(str_is(b, again, "thread-42") && mw_profbuf_intern_str(b, "d", 1) == 0);
    mw_profbuf_counts(b, &c);
    CHECK(c.strings == 3 && c.overflow == 2);
    mw_profbuf_reset(b); /* a reset frees the renames' room too */
    for (int i = 0; i < 4; i++)
        CHECK(mw_profbuf_intern_str(b, names[i], strlen(names[i])) == (mw_id_t)(i + 1));
    mw_profbuf_free(b);
}

static void profbuf_frames(void) {
    mw_profbuf_t *b = new_buf(4, 3, 8, 256, 16);
    mw_id_t f = mw_profbuf_intern_str(b, "f", 1), file = mw_profbuf_intern_str(b, "a.py", 4);
    mw_frame_t fr[4];
    for (int i = 0; i < 4; i++) {
        memset(&fr[i], 0, sizeof fr[i]);
        fr[i].name = f;
        fr[i].file = file;
        fr[i].line = 10 + i;
        fr[i].first_line = 9;
    }
    for (int i = 0; i < 3; i++)
        CHECK(mw_profbuf_intern_frame(b, &fr[i]) == (mw_id_t)(i + 1));
    CHECK(mw_profbuf_intern_frame(b, &fr[3]) == 0);
    CHECK(mw_profbuf_intern_frame(b, &fr[1]) == 2);
    mw_profbuf_counts_t c;
    mw_profbuf_counts(b, &c);
    CHECK(c.frames == 3 && c.overflow == 1);
    for (int i = 0; i < 3; i++) {
        const mw_frame_t *g = mw_profbuf_frame(b, (mw_id_t)(i + 1));
        CHECK(g && g->line == 10 + i && g->name == f && g->file == file && g->first_line == 9);
    }
    CHECK(mw_profbuf_frame(b, 0) == NULL && mw_profbuf_frame(b, 4) == NULL);
    mw_profbuf_free(b);
}

static int stack_is(const mw_profbuf_t *b, uint32_t i, const mw_id_t *frames, uint32_t depth,
                    mw_id_t thread, uint64_t cpu_samples) {
    const mw_stack_t *s = mw_profbuf_stack(b, i);
    if (!s || s->depth != depth || s->thread != thread || s->v.cpu_samples != cpu_samples) return 0;
    return depth == 0 || memcmp(mw_profbuf_stack_frames(b, s), frames, depth * sizeof *frames) == 0;
}

static void profbuf_stacks(void) {
    mw_values_t one = {1, 1000, 1, 2000};
    mw_profbuf_counts_t c;

    /* the stack count limit: a third distinct stack is refused; adding to a known one works */
    mw_profbuf_t *b = new_buf(2, 8, 8, 256, 64);
    mw_id_t a[] = {1, 2}, bb[] = {3, 2, 1}, cc[] = {4};
    CHECK(mw_profbuf_add(b, a, 2, 7, 0, &one) == 0);
    CHECK(mw_profbuf_add(b, bb, 3, 7, 0, &one) == 0);
    CHECK(mw_profbuf_add(b, cc, 1, 7, 0, &one) == -1);
    CHECK(mw_profbuf_add(b, a, 2, 8, 0, &one) == -1); /* same frames, another thread */
    CHECK(mw_profbuf_add(b, a, 2, 7, 5, &one) == -1); /* same frames, another label set */
    CHECK(mw_profbuf_add(b, a, 2, 7, 0, &one) == 0);
    mw_profbuf_counts(b, &c);
    CHECK(c.stacks == 2 && c.overflow == 3 && c.frame_slots_used == 5);
    CHECK(stack_is(b, 0, a, 2, 7, 2) && stack_is(b, 1, bb, 3, 7, 1));
    CHECK(mw_profbuf_stack(b, 0)->v.wall_ns == 4000);
    CHECK(mw_profbuf_add_at(b, 2, &one) == -1 && mw_profbuf_add_at(b, 1, &one) == 0);
    CHECK(stack_is(b, 1, bb, 3, 7, 2));
    mw_profbuf_free(b);

    /* the frame-slot limit, to the slot: 3 + 1 fill 4, a stack of 2 does not fit */
    b = new_buf(10, 8, 8, 256, 4);
    CHECK(mw_profbuf_add(b, bb, 3, 1, 0, &one) == 0);
    CHECK(mw_profbuf_add(b, a, 2, 1, 0, &one) == -1);
    CHECK(mw_profbuf_add(b, cc, 1, 1, 0, &one) == 0);
    CHECK(mw_profbuf_add(b, cc, 0, 2, 0, &one) == 0); /* an empty stack needs no slot */
    mw_profbuf_counts(b, &c);
    CHECK(c.stacks == 3 && c.frame_slots_used == 4 && c.overflow == 1);
    CHECK(stack_is(b, 0, bb, 3, 1, 1) && stack_is(b, 1, cc, 1, 1, 1));
    mw_profbuf_free(b);

    /* a full table of 1000 stacks: 1000 more are refused, each of the first is found again */
    enum { N = 1000 };
    b = new_buf(N, 8, 8, 256, 3 * N);
    for (uint32_t i = 0; i < 2 * N; i++) {
        mw_id_t fr[3] = {i + 1, i % 7 + 1, 99};
        uint32_t idx = UINT32_MAX;
        int rc = mw_profbuf_add_ex(b, fr, 3, 1, i % 3, &one, &idx);
        CHECK(i < N ? rc == 0 && idx == i : rc == -1);
    }
    for (uint32_t i = 0; i < N; i++) {
        mw_id_t fr[3] = {i + 1, i % 7 + 1, 99};
        CHECK(mw_profbuf_add(b, fr, 3, 1, i % 3, &one) == 0);
    }
    mw_profbuf_counts(b, &c);
    CHECK(c.stacks == N && c.overflow == N && c.frame_slots_used == 3 * N);
    int intact = 1;
    for (uint32_t i = 0; i < N; i++) {
        mw_id_t fr[3] = {i + 1, i % 7 + 1, 99};
        intact &= stack_is(b, i, fr, 3, 1, 2) && mw_profbuf_stack(b, i)->labelset == i % 3;
    }
    CHECK(intact);

    /* a reset empties every table and the counter; ids start again at 1 */
    uint64_t gen = mw_profbuf_generation(b);
    mw_profbuf_reset(b);
    mw_profbuf_counts(b, &c);
    CHECK(c.stacks == 0 && c.frames == 0 && c.strings == 0 && c.overflow == 0 &&
          c.frame_slots_used == 0 && c.string_bytes_used == 0);
    CHECK(mw_profbuf_generation(b) != gen);
    CHECK(mw_profbuf_intern_str(b, "again", 5) == 1);
    mw_id_t fr[3] = {5, 6, 7};
    uint32_t idx = UINT32_MAX;
    CHECK(mw_profbuf_add_ex(b, fr, 3, 1, 0, &one, &idx) == 0 && idx == 0);
    CHECK(mw_profbuf_add_at(b, 1, &one) == -1);
    mw_profbuf_free(b);
}

static void profbuf_merge(void) {
    /* src holds 6 stacks over 6 frames; dst takes 4 stacks: 2 are lost and counted, the 4
     * that fit carry the same names, lines and values */
    mw_values_t v = {3, 30, 5, 50};
    mw_profbuf_t *src = new_buf(16, 16, 16, 1024, 64);
    mw_id_t file = mw_profbuf_intern_str(src, "m.py", 4), th = mw_profbuf_intern_str(src, "T", 1);
    mw_id_t ids[6];
    for (int i = 0; i < 6; i++) {
        char name[16];
        snprintf(name, sizeof name, "f%d", i);
        mw_frame_t f = {mw_profbuf_intern_str(src, name, strlen(name)), file, 100 + i, 1};
        ids[i] = mw_profbuf_intern_frame(src, &f);
    }
    for (int i = 0; i < 6; i++) {
        mw_id_t stack[2] = {ids[i], ids[(i + 1) % 6]};
        CHECK(mw_profbuf_add(src, stack, 2, th, 0, &v) == 0);
    }
    mw_profbuf_t *dst = new_buf(4, 16, 16, 1024, 64);
    CHECK(mw_profbuf_merge(dst, src) == 2);
    mw_profbuf_counts_t c;
    mw_profbuf_counts(dst, &c);
    CHECK(c.stacks == 4 && c.overflow == 2);
    for (uint32_t i = 0; i < 4; i++) {
        const mw_stack_t *s = mw_profbuf_stack(dst, i);
        const mw_id_t *fr = mw_profbuf_stack_frames(dst, s);
        const mw_frame_t *leaf = mw_profbuf_frame(dst, fr[0]);
        const mw_frame_t *caller = mw_profbuf_frame(dst, fr[1]);
        char want[16];
        snprintf(want, sizeof want, "f%u", i);
        CHECK(s->depth == 2 && leaf && caller && str_is(dst, leaf->name, want));
        CHECK(leaf->line == 100 + (int)i && caller->line == 100 + (int)(i + 1) % 6);
        CHECK(str_is(dst, leaf->file, "m.py") && str_is(dst, s->thread, "T"));
        CHECK(s->v.cpu_samples == 3 && s->v.cpu_ns == 30 && s->v.wall_samples == 5 &&
              s->v.wall_ns == 50);
    }
    /* merging again adds to the same 4 stacks */
    CHECK(mw_profbuf_merge(dst, src) == 2);
    CHECK(mw_profbuf_nstacks(dst) == 4 && mw_profbuf_stack(dst, 3)->v.wall_ns == 100);
    mw_profbuf_free(dst);

    /* a destination whose string table is full loses every stack needing a new string */
    dst = new_buf(16, 16, 2, 1024, 64);
    CHECK(mw_profbuf_merge(dst, src) == 6);
    CHECK(mw_profbuf_nstacks(dst) == 0);
    mw_profbuf_free(dst);
    mw_profbuf_free(src);
}

/* ---- json --------------------------------------------------------------------------------- */

typedef struct {
    int rc, bad;
    char uid[64];
    const char *why;
} answer_t;

static answer_t read_answer(const char *body, size_t len, size_t n) {
    answer_t a = {0, -1, "", NULL};
    char *copy = exact_copy(body, len);
    memset(a.uid, '#', sizeof a.uid);
    a.rc = mw_upload_json_project_uid(copy, len, a.uid, n, &a.bad, &a.why);
    free(copy);
    return a;
}

static answer_t answer(const char *body) {
    return read_answer(body, strlen(body), sizeof((answer_t *)0)->uid);
}

static int refused(const char *body, const char *why_part) {
    answer_t a = answer(body);
    return a.rc == -1 && a.why && strstr(a.why, why_part) != NULL;
}

static void json_valid(void) {
    answer_t a = answer("{\"success\":true,\"data\":{\"project_uid\":\"abc\"}}");
    CHECK(a.rc == 0 && a.bad == 0 && strcmp(a.uid, "abc") == 0);
    a = answer(" \r\n\t{ \"data\" : { \"other\": [1, {\"x\": null}], \"project_uid\" : \"t-1\" },"
               " \"extra\": {\"success\": false}, \"success\" : true }\n ");
    CHECK(a.rc == 0 && a.bad == 0 && strcmp(a.uid, "t-1") == 0);
    a = answer("{\"success\":true,\"data\":{\"project_uid\":\"\\u0061b\\/c\\u00e9\"}}");
    CHECK(a.rc == 0 && a.bad == 0 && strcmp(a.uid, "ab/c\xc3\xa9") == 0);
    a = answer("{\"success\":true,\"data\":{\"project_uid\":\"\"}}");
    CHECK(a.rc == 0 && a.bad == 0 && a.uid[0] == '\0');
    /* the body is read to len only: what follows in memory is not part of it */
    const char *longer = "{\"success\":true,\"data\":{\"project_uid\":\"z\"}}garbage";
    a = read_answer(longer, strlen(longer) - 7, 64);
    CHECK(a.rc == 0 && strcmp(a.uid, "z") == 0);
}

static void json_uid_limits(void) {
    const char *body = "{\"success\":true,\"data\":{\"project_uid\":\"abcdef\"}}";
    answer_t a = read_answer(body, strlen(body), 7); /* 6 bytes fit in 7 */
    CHECK(a.rc == 0 && a.bad == 0 && strcmp(a.uid, "abcdef") == 0);
    a = read_answer(body, strlen(body), 6); /* 6 bytes do not fit in 6: cut, said bad */
    CHECK(a.rc == 0 && a.bad == 1 && strcmp(a.uid, "abcde") == 0);
    a = read_answer(body, strlen(body), 1);
    CHECK(a.rc == 0 && a.bad == 1 && a.uid[0] == '\0' && a.uid[1] == '#');
    a = answer("{\"success\":true,\"data\":{\"project_uid\":\"ab\\u0000cd\"}}");
    CHECK(a.rc == 0 && a.bad == 1);
}

static void json_wrong_types(void) {
    const char *no_success = "\"success\": true";
    const char *no_uid = "data.project_uid";
    CHECK(refused("{\"data\":{\"project_uid\":\"a\"}}", no_success));
    CHECK(refused("{\"success\":false,\"data\":{\"project_uid\":\"a\"}}", no_success));
    CHECK(refused("{\"success\":\"true\",\"data\":{\"project_uid\":\"a\"}}", no_success));
    CHECK(refused("{\"success\":1,\"data\":{\"project_uid\":\"a\"}}", no_success));
    CHECK(refused("{\"success\":null,\"data\":{\"project_uid\":\"a\"}}", no_success));
    CHECK(refused("{\"success\":true}", no_uid));
    CHECK(refused("{\"success\":true,\"data\":null}", no_uid));
    CHECK(refused("{\"success\":true,\"data\":[{\"project_uid\":\"a\"}]}", no_uid));
    CHECK(refused("{\"success\":true,\"data\":\"project_uid\"}", no_uid));
    CHECK(refused("{\"success\":true,\"data\":{}}", no_uid));
    CHECK(refused("{\"success\":true,\"data\":{\"project_uid\":7}}", no_uid));
    CHECK(refused("{\"success\":true,\"data\":{\"project_uid\":null}}", no_uid));
    CHECK(refused("{\"success\":true,\"data\":{\"project_uid\":[\"a\"]}}", no_uid));
    CHECK(refused("{\"success\":true,\"project_uid\":\"a\"}", no_uid));
    const char *not_object = "not a JSON object";
    CHECK(refused("", not_object));
    CHECK(refused("   ", not_object));
    CHECK(refused("[]", not_object));
    CHECK(refused("null", not_object));
    CHECK(refused("\"abc\"", not_object));
    CHECK(refused("42", not_object));
    CHECK(refused("{\"success\":true,\"data\":{\"project_uid\":\"a\"},}", not_object));
    CHECK(refused("{\"success\":tru,\"data\":{\"project_uid\":\"a\"}}", not_object));
    CHECK(refused("{\"success\":true \"data\":{\"project_uid\":\"a\"}}", not_object));
    CHECK(refused("{\"success\":true,\"data\":{\"project_uid\":\"a\\x\"}}", not_object));
    CHECK(refused("\xef\xbb\xbf{\"success\":true,\"data\":{\"project_uid\":\"a\"}}", not_object));
}

static void json_trailing_and_truncated(void) {
    const char *ok =
        "{\"success\":true,\"data\":{\"project_uid\":\"abc\",\"n\":[1,2,{\"k\":\"v\"}]}}";
    size_t len = strlen(ok);
    char buf[256];
    const char *tails[] = {"x", "{}", "}", "/* c */", "1", "\"s\""};
    for (size_t i = 0; i < sizeof tails / sizeof *tails; i++) {
        snprintf(buf, sizeof buf, "%s \n%s", ok, tails[i]);
        CHECK(refused(buf, "trailing data"));
    }
    memcpy(buf, ok, len);
    buf[len] = '\0';
    buf[len + 1] = ' ';
    answer_t a = read_answer(buf, len + 2, 64); /* a NUL byte after the object */
    CHECK(a.rc == -1 && a.why && strstr(a.why, "trailing data"));
    /* every proper prefix is refused (no prefix of it is a complete object) */
    int all_refused = 1;
    for (size_t n = 0; n < len; n++) {
        a = read_answer(ok, n, 64);
        all_refused &= a.rc == -1 && a.why != NULL;
    }
    CHECK(all_refused);
    /* a length beyond INT_MAX is refused before a byte is read */
    a.why = NULL;
    CHECK(mw_upload_json_project_uid(ok, (size_t)INT_MAX + 1, a.uid, 64, &a.bad, &a.why) == -1 &&
          a.why != NULL);
}

/* {"success":true,"data":{"project_uid":"d"},"x":[[...]]}: the answer object plus `arrays`
 * nested arrays is arrays + 1 levels deep. */
static answer_t nested(int arrays) {
    size_t cap = (size_t)arrays * 2 + 128;
    char *b = malloc(cap);
    if (!b) abort();
    int k = snprintf(b, cap, "{\"success\":true,\"data\":{\"project_uid\":\"d\"},\"x\":");
    for (int i = 0; i < arrays; i++)
        b[k++] = '[';
    for (int i = 0; i < arrays; i++)
        b[k++] = ']';
    b[k++] = '}';
    answer_t a = read_answer(b, (size_t)k, 64);
    free(b);
    return a;
}

static void json_nesting(void) {
    answer_t a = nested(MW_UPLOAD_JSON_DEPTH - 1);
    CHECK(a.rc == 0 && strcmp(a.uid, "d") == 0);
    CHECK(nested(MW_UPLOAD_JSON_DEPTH).rc == -1);
    CHECK(nested(100000).rc == -1); /* refused at the limit, not by exhausting the stack */
    /* the answer's own members nested too deep: refused as a whole */
    char b[4096];
    int k = snprintf(b, sizeof b, "{\"success\":true,\"data\":");
    for (int i = 0; i < 70; i++)
        k += snprintf(b + k, sizeof b - (size_t)k, "{\"project_uid\":");
    k += snprintf(b + k, sizeof b - (size_t)k, "\"deep\"");
    for (int i = 0; i < 71; i++)
        b[k++] = '}';
    b[k] = '\0';
    CHECK(refused(b, "not a JSON object"));
}

/* ---- line tables ------------------------------------------------------------------------------
 */

/* Entry starts of a table and the code units before each: for 3.10, every byte pair (its first
 * byte is a length in bytes); for 3.11+, every byte with bit 7 set (its low 3 bits are length
 * - 1 in code units). Returns the number of starts, with len itself as the last one. */
static size_t entry_starts(int format, const uint8_t *t, size_t len, size_t *at, long *units) {
    size_t n = 0;
    long pos = 0;
    for (size_t i = 0; i < len;) {
        if (format == MW_LT_310) {
            if (i + 1 >= len) break;
            at[n] = i;
            units[n++] = pos;
            pos += t[i];
            i += 2;
            continue;
        }
        if (t[i] & 0x80) {
            at[n] = i;
            units[n++] = pos;
            pos += (t[i] & 7) + 1;
        }
        i++;
    }
    at[n] = len;
    units[n++] = pos;
    if (format == MW_LT_310)
        for (size_t j = 0; j < n; j++)
            units[j] /= 2;
    return n;
}

static int hexval(int c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* One code object: every code unit against CPython's own lines; past the end and lasti < 0
 * give firstlineno; a table cut at an entry start keeps the lines before the cut and gives
 * firstlineno after it; a cut inside an entry keeps the lines before that entry. */
static void linetable_case(int format, int first, long units, const uint8_t *table, size_t len,
                           const int *want) {
    uint8_t *t = exact_copy(table, len);
    int all = 1;
    for (long i = 0; i < units; i++)
        all &= mw_linetable_line(format, t, len, first, (int)i) == want[i];
    CHECK(all);
    CHECK(mw_linetable_line(format, t, len, first, -1) == first);
    CHECK(mw_linetable_line(format, t, len, first, (int)units) == first);
    CHECK(mw_linetable_line(format, t, len, first, (int)units + 1000) == first);
    CHECK(mw_linetable_line(format, NULL, 0, first, 0) == first);
    free(t);

    size_t *at = malloc((len + 2) * sizeof *at);
    long *pos = malloc((len + 2) * sizeof *pos);
    if (!at || !pos) abort();
    size_t n = entry_starts(format, table, len, at, pos);
    CHECK(pos[n - 1] == units);
    size_t step = n > 8 ? n / 8 : 1;
    for (size_t e = 0; e < n; e += step) {
        for (int inside = 0; inside < 2; inside++) {
            size_t cut = at[e] + (size_t)inside;
            if (cut > len || (inside && e + 1 < n && cut >= at[e + 1])) continue;
            uint8_t *p = exact_copy(table, cut);
            int ok = 1;
            for (long i = 0; i < units; i++) {
                int got = mw_linetable_line(format, p, cut, first, (int)i);
                if (i < pos[e])
                    ok &= got == want[i];
                else if (!inside)
                    ok &= got == first;
                else
                    ok &= got > 0;
            }
            CHECK(ok);
            free(p);
        }
    }
    free(at);
    free(pos);
}

static int linetable_cases(FILE *in, long *ncases) {
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    while ((got = getline(&line, &cap, in)) > 0) {
        int format, first, off = 0;
        long units;
        if (sscanf(line, "%d %d %ld %n", &format, &first, &units, &off) != 3 || units < 0 ||
            (format != MW_LT_310 && format != MW_LT_311)) {
            fprintf(stderr, "linetable: bad input line: %.80s\n", line);
            free(line);
            return -1;
        }
        char *hex = line + off;
        char *sp = strchr(hex, ' ');
        if (!sp) {
            fprintf(stderr, "linetable: no lines field: %.80s\n", line);
            free(line);
            return -1;
        }
        size_t len = hex[0] == '-' ? 0 : (size_t)(sp - hex) / 2;
        uint8_t *table = malloc(len ? len : 1);
        int *want = malloc(((size_t)units + 1) * sizeof *want);
        if (!table || !want) abort();
        for (size_t i = 0; i < len; i++)
            table[i] = (uint8_t)(hexval(hex[2 * i]) * 16 + hexval(hex[2 * i + 1]));
        char *p = sp + 1;
        for (long i = 0; i < units; i++) {
            want[i] = (int)strtol(p, &p, 10);
            if (*p == ',') p++;
        }
        linetable_case(format, first, units, table, len, want);
        free(table);
        free(want);
        (*ncases)++;
    }
    free(line);
    return 0;
}

/* Tables of random bytes: the decoder stays inside them and answers a line or firstlineno. */
static void linetable_random(void) {
    uint64_t s = 0x9E3779B97F4A7C15u;
    int positive = 1;
    for (int round = 0; round < 2000; round++) {
        size_t len = (size_t)(round % 97);
        uint8_t *t = malloc(len ? len : 1);
        if (!t) abort();
        for (size_t i = 0; i < len; i++) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            t[i] = (uint8_t)s;
        }
        for (int lasti = 0; lasti < 300; lasti += 7) {
            positive &= mw_linetable_line(MW_LT_310, t, len, 40, lasti) > 0;
            positive &= mw_linetable_line(MW_LT_311, t, len, 40, lasti) > 0;
        }
        free(t);
    }
    CHECK(positive);
    /* 3.11+: a table whose first byte is not an entry start is corrupt: firstlineno */
    const uint8_t bad[] = {0x05, 0x80 | (13 << 3), 0x04};
    CHECK(mw_linetable_line(MW_LT_311, bad, sizeof bad, 12, 0) == 12);
    /* 3.11+: a line delta varint cut by the table's end */
    const uint8_t cut[] = {0x80 | (14 << 3), 0x7f};
    CHECK(mw_linetable_line(MW_LT_311, cut, sizeof cut, 12, 0) > 0);
}

/* Thread names: a forgotten thread keeps its name through one whole reap (the sampler names the
 * samples it left at its next drain), unless its id is taken again meanwhile. */
static int named(long tid, const char *want) {
    char name[MW_THREAD_NAME_MAX];
    uint32_t seq;
    mw_threads_lookup(tid, name, sizeof name, &seq);
    return strcmp(name, want) == 0;
}

static void threads_forget_reap(void) {
    CHECK(mw_threads_set_name(101, "worker-1") == 0);
    CHECK(mw_threads_set_name(102, "worker-2") == 0);
    mw_threads_forget(101);
    CHECK(named(101, "worker-1")); /* forgotten: still named until reaped */
    mw_threads_reap();
    CHECK(named(101, "worker-1")); /* the reap right after the forget keeps it */
    mw_threads_reap();
    CHECK(named(101, "")); /* gone at the second */
    CHECK(named(102, "worker-2"));
    /* an id taken again by a new thread between the forget and the reaps keeps the new name */
    mw_threads_forget(102);
    CHECK(mw_threads_set_name(102, "worker-2b") == 0);
    mw_threads_reap();
    mw_threads_reap();
    CHECK(named(102, "worker-2b"));
    /* more forgets than the queue holds (no sampler reaping): the rest go at once */
    for (long t = 1000; t < 3100; t++)
        CHECK(mw_threads_set_name(t, "many") == 0);
    for (long t = 1000; t < 3100; t++)
        mw_threads_forget(t);
    int kept = 0;
    for (long t = 1000; t < 3100; t++)
        kept += named(t, "many");
    CHECK(kept > 0 && kept < 2100);
    mw_threads_reap();
    mw_threads_reap();
    kept = 0;
    for (long t = 1000; t < 3100; t++)
        kept += named(t, "many");
    CHECK(kept == 0);
    /* the table is usable again: its slots were freed */
    for (long t = 5000; t < 5000 + MW_THREADS_MAX / 2; t++)
        CHECK(mw_threads_set_name(t, "again") == 0);
}

/* Request counts on label sets: counted from four threads while another takes them with a small
 * bound; every request is taken exactly once, by set. */
#define REQ_SETS 40
#define REQ_PER_THREAD 200000

static uint32_t g_req_ids[REQ_SETS];
static volatile int g_req_done;

static void *count_requests(void *arg) {
    uintptr_t t = (uintptr_t)arg;
    for (uint32_t i = 0; i < REQ_PER_THREAD; i++)
        mw_labels_count_request(g_req_ids[(i + t) % REQ_SETS]);
    return NULL;
}

static void labels_requests(void) {
    char vals[REQ_SETS][16];
    for (int i = 0; i < REQ_SETS; i++) {
        const char *k = "endpoint", *v = vals[i];
        snprintf(vals[i], sizeof vals[i], "/e%d", i);
        g_req_ids[i] = mw_labels_intern(&k, &v, 1);
        CHECK(g_req_ids[i] == (uint32_t)i + 1);
    }
    CHECK(mw_labels_count_request(0) == -1);
    CHECK(mw_labels_count_request(REQ_SETS + 1) == -1); /* not interned */
    uint32_t ids[7];
    uint64_t counts[7], taken[REQ_SETS + 1] = {0};
    CHECK(mw_labels_take_requests(ids, counts, 7) == 0);
    pthread_t th[4];
    for (uintptr_t t = 0; t < 4; t++)
        CHECK(pthread_create(&th[t], NULL, count_requests, (void *)t) == 0);
    for (int round = 0; round < 2000; round++) {
        uint32_t n = mw_labels_take_requests(ids, counts, 7);
        CHECK(n <= 7);
        for (uint32_t i = 0; i < n; i++) {
            CHECK(ids[i] >= 1 && ids[i] <= REQ_SETS && counts[i] > 0);
            if (ids[i] >= 1 && ids[i] <= REQ_SETS) taken[ids[i]] += counts[i];
        }
    }
    for (int t = 0; t < 4; t++)
        pthread_join(th[t], NULL);
    uint32_t n;
    while ((n = mw_labels_take_requests(ids, counts, 7)) > 0)
        for (uint32_t i = 0; i < n; i++)
            if (ids[i] >= 1 && ids[i] <= REQ_SETS) taken[ids[i]] += counts[i];
    uint64_t all = 0;
    for (int i = 1; i <= REQ_SETS; i++) {
        CHECK(taken[i] == 4ull * REQ_PER_THREAD / REQ_SETS);
        all += taken[i];
    }
    CHECK(all == 4ull * REQ_PER_THREAD);
    /* after a fork the child starts from zero */
    mw_labels_count_request(g_req_ids[0]);
    mw_labels_after_fork_child();
    CHECK(mw_labels_take_requests(ids, counts, 7) == 0);
}

/* The SIGTERM guard: a SIGTERM taken by the main thread just before it blocks is sent again
 * until the chained handler has seen it while blocked; one taken by another thread is redirected
 * to the main thread. The chained handler stands for CPython's: it counts, and posts the
 * semaphore the main thread waits on from its second call on (a Python handler would run then). */
static sem_t g_guard_sem;
static volatile sig_atomic_t g_guard_calls;

static void counting_handler(int sig) {
    (void)sig;
    if (++g_guard_calls >= 2) sem_post(&g_guard_sem);
}

static void *term_from_thread(void *arg) {
    (void)arg;
    pthread_kill(pthread_self(), SIGTERM);
    return NULL;
}

static int wait_posted(double seconds) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)seconds;
    while (sem_timedwait(&g_guard_sem, &ts) != 0)
        if (errno != EINTR) return 0;
    return 1;
}

static void termguard(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = counting_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_ONSTACK;
    CHECK(sem_init(&g_guard_sem, 0, 0) == 0);
    CHECK(sigaction(SIGTERM, &sa, NULL) == 0);
    CHECK(mw_termguard_arm() == 0);
    CHECK(mw_termguard_arm() == 0); /* idempotent */
    /* taken by the main thread before it blocks: the chained handler runs once, then the timer
     * sends it again while the main thread waits */
    raise(SIGTERM);
    CHECK(g_guard_calls == 1);
    CHECK(wait_posted(3));
    CHECK(g_guard_calls >= 2);
    CHECK(mw_termguard_rekicks() >= 1);
    /* taken by another thread: redirected to the main thread (the chained handler runs in both) */
    sigaction(SIGTERM, &sa, NULL); /* stop the re-sends: the guard is out of the way */
    while (sem_trywait(&g_guard_sem) == 0) {
    }
    g_guard_calls = 0;
    CHECK(mw_termguard_arm() == 0);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, term_from_thread, NULL) == 0);
    pthread_join(t, NULL);
    CHECK(wait_posted(3));
    CHECK(g_guard_calls >= 2);
    /* a disposition that is not a plain handler is left alone */
    signal(SIGTERM, SIG_IGN);
    CHECK(mw_termguard_arm() == -1);
}

/* Span sets: pairs over their base, ids recycled only two windows after release, a stale id never
 * answers (neither pairs nor a base), a full table refuses (the caller keeps the base), malformed
 * ids refused, long names cut on a UTF-8 boundary; the same under a thread interning and
 * releasing while another reads bases and finishes windows. */
static _Atomic int g_span_stop;

static void *span_reader(void *arg) {
    const uint32_t *live = arg;
    while (!atomic_load(&g_span_stop)) {
        uint32_t id = atomic_load((_Atomic uint32_t *)live);
        uint32_t b = mw_labels_base(id);
        CHECK(b == 0 || b == 1); /* its base, or 0 once stale: never another set */
        mw_labels_window_rotated();
        mw_labels_window_done();
    }
    return NULL;
}

static void spansets(void) {
    CHECK(mw_labels_intern_span(0, "00f067aa0ba902b7", "", "off") == 0); /* no exporter yet */
    mw_labels_spans_enable(1);
    const char *k[2] = {"endpoint", "span_id"}, *v[2] = {"/a", "ffffffffffffffff"};
    uint32_t base = mw_labels_intern(k, v, 2);
    CHECK(base == 1);
    const char *span = "00f067aa0ba902b7", *trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    uint32_t id = mw_labels_intern_span(base, span, trace, "GET /a");
    CHECK(id & MW_SPANSET_FLAG);
    const char *const *kk, *const *vv;
    CHECK(mw_labels_get(id, &kk, &vv) == 3);
    CHECK(!strcmp(kk[0], "span_id") && !strcmp(vv[0], span));
    CHECK(!strcmp(kk[1], "span_name") && !strcmp(vv[1], "GET /a"));
    CHECK(!strcmp(kk[2], "endpoint") && !strcmp(vv[2], "/a")); /* base's own span_id left out */
    const char *s2, *t2;
    CHECK(mw_labels_span_ids(id, &s2, &t2) == 0 && !strcmp(s2, span) && !strcmp(t2, trace));
    CHECK(mw_labels_base(id) == base && mw_labels_base(base) == base);
    /* seen by a sample: only that set, only while it is live; other ids are ignored */
    CHECK(!mw_labels_span_was_seen(id));
    mw_labels_span_seen(base);
    mw_labels_span_seen(0);
    mw_labels_span_seen(id ^ (1u << 20)); /* another generation of the slot */
    CHECK(!mw_labels_span_was_seen(id) && !mw_labels_span_was_seen(base));
    mw_labels_span_seen(id);
    mw_labels_span_seen(id);
    CHECK(mw_labels_span_was_seen(id));
    /* released: still readable until the window active at the release is encoded */
    mw_labels_window_rotated(); /* window 0 rotated: being encoded */
    mw_labels_release_span(id); /* during window 1 */
    mw_labels_release_span(id);
    mw_labels_window_done(); /* window 0 done */
    CHECK(mw_labels_get(id, &kk, &vv) == 3);
    mw_labels_window_rotated(); /* window 1 */
    CHECK(mw_labels_get(id, &kk, &vv) == 3);
    mw_labels_window_done();
    CHECK(mw_labels_get(id, &kk, &vv) == -1 && mw_labels_base(id) == 0);
    CHECK(mw_labels_span_ids(id, &s2, &t2) == -1);
    uint32_t again = mw_labels_intern_span(0, span, "", "");
    CHECK(again && again != id && (again & 0x3FFF) == (id & 0x3FFF)); /* same slot, new id */
    CHECK(mw_labels_get(again, &kk, &vv) == 1);                       /* no name: span_id only */
    CHECK(mw_labels_get(id, &kk, &vv) == -1);
    CHECK(!mw_labels_span_was_seen(again) && !mw_labels_span_was_seen(id)); /* a new set: unseen */
    mw_labels_release_span(again);
    /* malformed */
    CHECK(mw_labels_intern_span(0, "00F067AA0BA902B7", "", "x") == 0);
    CHECK(mw_labels_intern_span(0, "00f067aa0ba902b", "", "x") == 0);
    CHECK(mw_labels_intern_span(0, span, "4bf9", "x") == 0);
    uint32_t unnamed = mw_labels_intern_span(0, span, trace, NULL);
    CHECK(unnamed != 0 && mw_labels_get(unnamed, &kk, &vv) == 1);
    mw_labels_release_span(unnamed);
    CHECK(mw_labels_intern_span(12345, span, trace, "x") == 0); /* unknown base */
    /* a long name is cut before a multi-byte character, not inside it */
    char name[400];
    memset(name, 'a', sizeof name);
    memcpy(name + MW_SPAN_NAME_MAX - 1, "\xc3\xa9", 2);
    name[sizeof name - 1] = 0;
    uint32_t cut = mw_labels_intern_span(0, span, "", name);
    CHECK(mw_labels_get(cut, &kk, &vv) == 2 && strlen(vv[1]) == MW_SPAN_NAME_MAX - 1);
    mw_labels_release_span(cut);
    /* full: refused until windows are done */
    mw_spansets_stats_t st;
    mw_labels_span_stats(&st);
    uint64_t refused0 = st.refused;
    static uint32_t ids[MW_SPANSETS_MAX];
    uint32_t n = 0;
    while (n < MW_SPANSETS_MAX && (ids[n] = mw_labels_intern_span(base, span, trace, "n")) != 0)
        n++;
    CHECK(n == MW_SPANSETS_MAX - 3); /* three released sets wait for their windows */
    mw_labels_span_stats(&st);
    CHECK(st.refused == refused0 + 1 && st.live == MW_SPANSETS_MAX);
    for (uint32_t i = 0; i < n; i++)
        mw_labels_release_span(ids[i]);
    mw_labels_window_rotated();
    mw_labels_window_done();
    mw_labels_span_stats(&st);
    CHECK(st.live == 0 && st.reclaimed == st.released);
    /* concurrent: one thread interns/releases, another reads bases and finishes windows */
    static _Atomic uint32_t live;
    pthread_t th;
    CHECK(pthread_create(&th, NULL, span_reader, (void *)&live) == 0);
    for (int i = 0; i < 200000; i++) {
        uint32_t x = mw_labels_intern_span(base, span, trace, "c");
        atomic_store(&live, x);
        if (x) CHECK(mw_labels_base(x) == base);
        mw_labels_release_span(x);
    }
    atomic_store(&g_span_stop, 1);
    pthread_join(th, NULL);
}

/* mw_cpusteal: readings (count, clock) of a perf task-clock event and its thread's CPU clock. */
static void steal_readings(void) {
    mw_steal_t s;
    uint64_t stolen = 0, ms = 1000000;
    /* a busy thread: both advance alike (the clock a little more, read after the count) */
    mw_steal_start(&s, 0, 5 * ms, 1);
    CHECK(mw_steal_less(&s, 10 * ms, 15 * ms + 1000, &stolen) == 10 * ms && stolen == 0);
    CHECK(mw_steal_less(&s, 20 * ms, 25 * ms + 1500, &stolen) == 20 * ms && stolen == 0);
    /* two reads a few us apart: the count ahead by less than the slack is not steal */
    CHECK(mw_steal_less(&s, 30 * ms + 9000, 35 * ms, &stolen) == 30 * ms + 9000 && stolen == 0);
    /* the host took the vCPU for 4 ms: the count ran on, the clock did not */
    CHECK(mw_steal_less(&s, 44 * ms + 9000, 45 * ms, &stolen) == 40 * ms + 9000);
    CHECK(stolen == 4 * ms && s.steal == 4 * ms);
    /* what was set aside stays aside; context switches (the clock ahead) take nothing back */
    CHECK(mw_steal_less(&s, 50 * ms, 52 * ms, &stolen) == 46 * ms && stolen == 0);
    CHECK(mw_steal_less(&s, 60 * ms, 70 * ms, &stolen) == 56 * ms && stolen == 0);
    /* a clock that goes back sets nothing aside, the next interval counts from it */
    CHECK(mw_steal_less(&s, 70 * ms, 60 * ms, &stolen) == 66 * ms && stolen == 0);
    CHECK(mw_steal_less(&s, 80 * ms, 61 * ms, &stolen) == 67 * ms && stolen == 9 * ms);
    /* an unknown start: the first reading only sets the pair */
    mw_steal_start(&s, 0, 0, 0);
    CHECK(mw_steal_less(&s, 50 * ms, 1 * ms, &stolen) == 50 * ms && stolen == 0);
    CHECK(mw_steal_less(&s, 60 * ms, 2 * ms, &stolen) == 51 * ms && stolen == 9 * ms);
    /* read jitter: the clock read 1 us after the count, but at one reading in 10 (and two in a
     * row once in 100) 20-600 us after it (an interrupt, a long VM exit between the two reads).
     * Each long gap puts the clock ahead for that reading only: none of it is steal. */
    {
        uint64_t us = 1000, count = 0, rng = 12345, total = 0, gap = us;
        mw_steal_start(&s, 0, us, 1);
        for (int i = 0; i < 10000; i++) {
            count += gap + 100 * us; /* the last reading's gap, then 100 us of work */
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            int long_gap = i % 10 == 0 || i % 100 == 5 || i % 100 == 6;
            gap = long_gap ? 20 * us + (rng >> 33) % (580 * us) : 1 * us;
            mw_steal_less(&s, count, count + gap, &stolen);
            total += stolen;
        }
        CHECK(total == 0 && s.steal == 0);
        /* a steal right after a context switch (the clock 18 us ahead since): that much less */
        mw_steal_start(&s, 0, 0, 1);
        CHECK(mw_steal_less(&s, 100 * us, 118 * us, &stolen) == 100 * us && stolen == 0);
        CHECK(mw_steal_less(&s, 3200 * us, 218 * us, &stolen) == 218 * us);
        CHECK(stolen == 3 * ms - 18 * us);
        CHECK(mw_steal_less(&s, 3300 * us, 318 * us, &stolen) == 318 * us && stolen == 0);
        /* the next steal is all counted */
        CHECK(mw_steal_less(&s, 6400 * us, 418 * us, &stolen) == 418 * us && stolen == 3 * ms);
        /* a stretch the count missed (an event stopped for 5 ms) then a steal of 8 ms: the 5 ms
         * rise might be a spike of one reading, but no more than MW_STEAL_CREDIT_NS of it */
        CHECK(mw_steal_less(&s, 6500 * us, 5518 * us, &stolen) == 518 * us && stolen == 0);
        CHECK(mw_steal_less(&s, 14600 * us, 5618 * us, &stolen) == 5618 * us - 5 * ms + 2 * ms);
        CHECK(stolen == 8 * ms - 2 * ms && MW_STEAL_CREDIT_NS == 2 * ms);
    }
    /* never below zero */
    mw_steal_start(&s, 0, 0, 1);
    CHECK(mw_steal_less(&s, 5 * ms, 0, &stolen) == 0 && stolen == 5 * ms);
}

/* The store's backlog: kept beyond its bound it drops the oldest; written into a directory that
 * fails it keeps all and stops at the first; written where it can, oldest first, each under its
 * own window start; a fork child forgets the parent's. */
static int backlog_waiting(void) {
    mw_backlog_stats_t st;
    mw_backlog_stats(&st);
    return (int)st.waiting;
}

static void backlog(void) {
    char dir[] = "/tmp/mw-backlog-XXXXXX", notdir[4200], store[4200], path[4400];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(notdir, sizeof notdir, "%s/a-file", dir);
    snprintf(store, sizeof store, "%s/store", dir);
    FILE *f = fopen(notdir, "w");
    CHECK(f != NULL);
    if (f) fclose(f);
    CHECK(mw_backlog_waits_for(ENOSPC) && mw_backlog_waits_for(EDQUOT) &&
          !mw_backlog_waits_for(EROFS));
    uint8_t data[64];
    for (int i = 0; i < MW_BACKLOG_MAX_FILES + 10; i++) { /* 10 more files than the bound */
        memset(data, i & 0xff, sizeof data);
        CHECK(mw_backlog_keep(1000 + i, data, sizeof data) == 0);
    }
    mw_backlog_stats_t st;
    mw_backlog_stats(&st);
    CHECK(st.waiting == MW_BACKLOG_MAX_FILES && st.dropped == 10 &&
          st.kept == MW_BACKLOG_MAX_FILES + 10);
    CHECK(st.waiting_bytes == MW_BACKLOG_MAX_FILES * sizeof data);
    /* bytes past the bound drop the oldest too; one profile larger than the bound is refused */
    size_t big = MW_BACKLOG_MAX_BYTES - 10 * sizeof data;
    uint8_t *bigp = calloc(1, big + 1);
    CHECK(bigp && mw_backlog_keep(5000, bigp, big) == 0);
    mw_backlog_stats(&st); /* the 10 newest small ones and the big one */
    CHECK(st.waiting_bytes == MW_BACKLOG_MAX_BYTES && st.waiting == 11);
    CHECK(st.dropped == 10 + MW_BACKLOG_MAX_FILES - 10);
    CHECK(mw_backlog_keep(6000, bigp, MW_BACKLOG_MAX_BYTES + 1) == -1);
    free(bigp);
    mw_backlog_stats(&st);
    CHECK(st.waiting == 11); /* refused without dropping the others */
    /* a fork child frees the parent's (which the parent still holds) */
    pid_t pid = fork();
    if (pid == 0) {
        mw_backlog_atfork_child();
        _exit(backlog_waiting() == 0 ? 0 : 1);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
          WEXITSTATUS(status) == 0);
    /* a store that cannot be written: nothing written, all still waiting, the failure given */
    mw_backlog_result_t res;
    CHECK(mw_backlog_write(notdir, "svc", 7, 0, &res) == 11);
    CHECK(res.files_written == 0 && res.failure.err == ENOTDIR && backlog_waiting() == 11);
    /* a store with room: all written, oldest first, each under its own window start */
    CHECK(mw_backlog_write(store, "svc", 7, 0, &res) == 0);
    CHECK(res.files_written == 11 && res.failure.err == 0 && backlog_waiting() == 0);
    CHECK(res.bytes_written == 10 * sizeof data + big);
    for (int i = 0; i < 10; i++) {
        snprintf(path, sizeof path, "%s/svc-7-%d.pb.gz", store, 1000 + MW_BACKLOG_MAX_FILES + i);
        struct stat sb;
        CHECK(stat(path, &sb) == 0 && sb.st_size == (off_t)sizeof data);
        FILE *in = fopen(path, "rb");
        uint8_t got[64] = {0};
        CHECK(in && fread(got, 1, sizeof got, in) == sizeof got &&
              got[0] == ((MW_BACKLOG_MAX_FILES + i) & 0xff));
        if (in) fclose(in);
        CHECK(unlink(path) == 0);
    }
    snprintf(path, sizeof path, "%s/svc-7-5000.pb.gz", store);
    CHECK(unlink(path) == 0);
    mw_backlog_stats(&st);
    CHECK(st.written == 11 && st.waiting_bytes == 0);
    CHECK(rmdir(store) == 0 && unlink(notdir) == 0 && rmdir(dir) == 0);
}

int main(int argc, char **argv) {
    const char *part = argc > 1 ? argv[1] : "";
    if (strcmp(part, "profbuf") == 0) {
        profbuf_strings();
        profbuf_frames();
        profbuf_stacks();
        profbuf_merge();
    } else if (strcmp(part, "json") == 0) {
        json_valid();
        json_uid_limits();
        json_wrong_types();
        json_trailing_and_truncated();
        json_nesting();
    } else if (strcmp(part, "linetable") == 0) {
        long ncases = 0;
        if (linetable_cases(stdin, &ncases) != 0) return 2;
        printf("linetable: %ld code objects\n", ncases);
    } else if (strcmp(part, "corrupt") == 0) {
        linetable_random();
    } else if (strcmp(part, "threads") == 0) {
        threads_forget_reap();
    } else if (strcmp(part, "requests") == 0) {
        labels_requests();
    } else if (strcmp(part, "spansets") == 0) {
        spansets();
    } else if (strcmp(part, "termguard") == 0) {
        termguard();
    } else if (strcmp(part, "steal") == 0) {
        steal_readings();
    } else if (strcmp(part, "backlog") == 0) {
        backlog();
    } else {
        fprintf(
            stderr,
            "usage: %s "
            "profbuf|json|corrupt|threads|requests|spansets|termguard|steal|backlog|linetable < "
            "cases\n",
            argv[0]);
        return 2;
    }
    printf("%s: %ld checks, %ld failed\n", part, g_checks, g_failed);
    return g_failed ? 1 : 0;
}
