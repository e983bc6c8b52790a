/* mw_linetable — maps an instruction index to a source line, from a copy of a code object's
 * line table. Pure functions over caller-owned bytes: any thread, async-signal-safe.
 *
 * Formats:
 *  MW_LT_310: CPython 3.10 co_linetable (PEP 626): pairs (bytecode delta in bytes, signed line
 *             delta; -128 = no line).
 *  MW_LT_311: CPython 3.11+ co_linetable (PEP 657 location table): entries of 1 header byte
 *             (bit 7 set, 4-bit code, 3-bit length-1 in code units) plus varint payloads.
 */
#ifndef MW_LINETABLE_H
#define MW_LINETABLE_H

#include <stddef.h>
#include <stdint.h>

enum { MW_LT_310 = 310, MW_LT_311 = 311 };

/* Returns the line executing at instruction index lasti (code units), or firstlineno when the
 * instruction has no line or lasti < 0. */
int mw_linetable_line(int format, const uint8_t *table, size_t len, int firstlineno, int lasti);

#endif
