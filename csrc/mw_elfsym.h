/* mw_elfsym — the native function an instruction address is in: its bounds and its name.
 *
 * Bounds come from the object's ELF function symbols when one covers the address (.symtab of
 * the file on disk, else of its separate debug file, plus .dynsym), else from the unwind table
 * (.eh_frame FDE [start, end), found by libunwind's unw_get_proc_info_by_ip). A function with
 * no symbol still gets its start, so every address inside it maps to the same function.
 *
 * Debug files searched, in order: /usr/lib/debug/.build-id/xx/yyyy.debug (the loaded object's
 * build-id), then the object's .gnu_debuglink name in its own directory, in .debug/ under it
 * and under /usr/lib/debug/<its directory>. A build-id file must carry the same build-id, a
 * debuglink file must match the recorded CRC; the file on disk itself is ignored when its
 * build-id differs from the loaded object's (replaced since it was loaded). An object whose
 * files give no symbol (the vDSO has no file) is named from the loader's .dynsym (dladdr1).
 *
 * Contract:
 *   - Threads: one thread at a time, no locks (the sampler thread). It takes the dynamic
 *     loader's lock (dl_iterate_phdr, dladdr1) and opens files: NOT async-signal-safe, and not
 *     to be called while a thread that may hold the loader lock or malloc's locks is paused.
 *   - Cost: the first address in an object reads that object's symbol tables once (files opened
 *     with O_CLOEXEC and closed again; a debuglink file is read whole for its CRC); every other
 *     lookup is a dl_iterate_phdr walk, a binary search and, for addresses no symbol covers, one
 *     FDE search. Callers cache per address and per function start.
 *   - Memory: per-object tables are allocated on first use and kept for the life of the process
 *     (never freed; an unloaded object's table stays, unused). out->name and out->path point
 *     into memory owned by this module or the loader: valid until the next call; copy them.
 */
#ifndef MW_ELFSYM_H
#define MW_ELFSYM_H

#include <stddef.h>
#include <stdint.h>

enum {
    MW_ELFSYM_NONE = 0,   /* bounds unknown: start is the address itself */
    MW_ELFSYM_SYMBOL = 1, /* a function symbol covers the address */
    MW_ELFSYM_FDE = 2,    /* an unwind-table entry covers the address */
};

typedef struct mw_elfsym {
    uintptr_t start;  /* the function's first instruction (absolute address) */
    uintptr_t end;    /* one past its last byte; 0 = unknown */
    uintptr_t bias;   /* the object's load bias: address in the ELF file = absolute - bias */
    uintptr_t base;   /* the object's lowest mapped address (dladdr's dli_fbase) */
    const char *name; /* the function's symbol (".cold" part suffix removed), NULL if none */
    size_t name_len;
    const char *path; /* the object's path, "" if unknown */
    int source;       /* MW_ELFSYM_* */
} mw_elfsym_t;

/* Resolves ip (absolute). Returns 0 with *out filled when a loaded object contains ip, else -1
 * (out->start = ip, everything else empty). */
int mw_elfsym_lookup(uintptr_t ip, mw_elfsym_t *out);

#endif
