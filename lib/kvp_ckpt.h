/* kvp_ckpt: training checkpoints — named byte sections in one file, with a
 * checksum, written atomically.
 *
 * Layout (little-endian):
 *   "KVPCKPT\n"  u32 version (1)  u32 n_sections  u64 file_size
 *   n_sections x { u32 name_len, name bytes, u64 size, size bytes }
 *   u64 FNV-1a-64 of every byte before it
 *
 * The writer goes through a temp file in the same directory, fsync and
 * rename, so a run killed at any moment leaves either the old checkpoint or
 * the new one, never half of one. The reader checks the length the header
 * records, every section bound and the checksum before anything is used: a
 * truncated or corrupt file is refused with a message saying which. What the
 * sections hold is the trainer's business (kvp_trainer.c). */
#ifndef KVP_CKPT_H
#define KVP_CKPT_H

#include <stddef.h>
#include <stdint.h>

#include "kvp_err.h"

#define KVP_CKPT_VERSION 1

typedef struct kvp_ckpt_section {
    const char *name;
    const void *data;
    uint64_t size;
} kvp_ckpt_section_t;

/* Writes the sections, in order, to path (temp file + fsync + rename). */
int kvp_ckpt_write(const char *path, const kvp_ckpt_section_t *sections, size_t n, kvp_err_t *err);

typedef struct kvp_ckpt kvp_ckpt_t;

/* Reads and verifies the whole file. */
int kvp_ckpt_read(kvp_ckpt_t **out, const char *path, kvp_err_t *err);
void kvp_ckpt_free(kvp_ckpt_t **c);

/* The section called name (NULL if absent); *size gets its length. */
const void *kvp_ckpt_find(const kvp_ckpt_t *c, const char *name, uint64_t *size);
/* Copies section name into dst, which must be exactly `size` bytes long;
 * a missing section or another length is a clear error. */
int kvp_ckpt_get(const kvp_ckpt_t *c, const char *name, void *dst, uint64_t size, kvp_err_t *err);

#endif
