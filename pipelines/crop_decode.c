/* The FFCV backend's crop decoders in C (pipelines/crop_decode.py): decode only a crop of a JPEG, then resize
 * it by area averaging.
 *
 * decode_region: FFCV 1.0.2 decodes every JPEG whole before cropping; here the rows below the region are never
 * read, the rows above it are skipped (entropy-decoded only), the columns beside it are not inverse-transformed
 * or colour-converted (libjpeg-turbo's jpeg_skip_scanlines/jpeg_crop_scanline), and libjpeg's DCT scaling
 * shrinks a large region by 1/2, 1/4 or 1/8 while decoding it.
 *
 * resize_area: OpenCV's INTER_AREA downscale (each output pixel the area-weighted mean of the input pixels it
 * covers), which FFCV's resize calls, in two separable passes: a vertical one over whole rows, which the
 * compiler vectorizes, then a horizontal one. OpenCV's took 1.8-2.5x as long for 230-450 px inputs to 224.
 *
 * crop_batch: the photo backend's host path (pipelines/photo_loader.py), a chunk of a batch in one call: each
 * record (JPEG or raw pixels) cut to its crop box with the two above, or enlarged by bilinear interpolation, so
 * that no Python runs per record.
 *
 * Plain C over the libjpeg API (libjpeg-turbo >= 1.5), loaded with ctypes and called from FFCV's compiled
 * worker threads and the photo backend's threads. Every call checks its arguments and refuses (returns -1)
 * rather than guess: the records come from files a stranger may have written. */
#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <jpeglib.h>

/* The converter's --max-pixels default (PIL's Image.MAX_IMAGE_PIXELS, convert/images.py): no stored record is
 * larger, and a header claiming more would make libjpeg allocate for it (a progressive JPEG's whole coefficient
 * buffer: gigabytes from a few hundred bytes). */
#define MAX_PIXELS 89478485ULL

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void on_error(j_common_ptr cinfo) { longjmp(((struct error_manager *)cinfo->err)->jump, 1); }

/* Warnings (corrupt entropy data: "premature end of data segment", "extraneous bytes before marker") are counted,
 * not printed, and fail the decode as errors do: libjpeg goes on past them with made-up pixels. */
static void on_message(j_common_ptr cinfo) { (void)cinfo; }

/* A progressive JPEG is read scan by scan before the first row comes out, each scan over every block: a few
 * hundred KB of empty scans over a large frame would take minutes. Encoders write about ten; more than MAX_SCANS
 * is refused (djpeg's -maxscans). */
#define MAX_SCANS 100

static void on_progress(j_common_ptr cinfo) {
    if (cinfo->is_decompressor && ((j_decompress_ptr)cinfo)->input_scan_number > MAX_SCANS) on_error(cinfo);
}

/* Whether this image itself defined every table its first scan uses. libjpeg keeps tables from image to image
 * in one decompressor, and libjpeg-turbo substitutes its standard Huffman tables for missing ones; each call
 * has a fresh decompressor, so a table present here came from this image's own DQT/DHT markers. */
static int has_own_tables(const struct jpeg_decompress_struct *cinfo) {
    for (int i = 0; i < cinfo->comps_in_scan; i++) {
        const jpeg_component_info *comp = cinfo->cur_comp_info[i];
        if (comp->quant_tbl_no < 0 || comp->quant_tbl_no >= NUM_QUANT_TBLS ||
            cinfo->quant_tbl_ptrs[comp->quant_tbl_no] == NULL)
            return 0;
        if (cinfo->arith_code) continue;
        if (cinfo->Ss == 0 && cinfo->Ah == 0 &&
            (comp->dc_tbl_no < 0 || comp->dc_tbl_no >= NUM_HUFF_TBLS || cinfo->dc_huff_tbl_ptrs[comp->dc_tbl_no] == NULL))
            return 0;
        if (cinfo->Se > 0 &&
            (comp->ac_tbl_no < 0 || comp->ac_tbl_no >= NUM_HUFF_TBLS || cinfo->ac_huff_tbl_ptrs[comp->ac_tbl_no] == NULL))
            return 0;
    }
    return cinfo->comps_in_scan > 0;
}

/* decode_region's work on a decompressor the caller creates and destroys: -1 as soon as anything is refused. */
static int decode_with(struct jpeg_decompress_struct *cinfo, const unsigned char *src, uint64_t size,
                       unsigned char *dst, uint64_t capacity, uint64_t top, uint64_t left, uint64_t height,
                       uint64_t width, uint32_t scale_denom, double *region) {
    jpeg_mem_src(cinfo, src, (unsigned long)size);
    if (jpeg_read_header(cinfo, TRUE) != JPEG_HEADER_OK || !has_own_tables(cinfo)) return -1;
    if ((uint64_t)cinfo->image_width * cinfo->image_height > MAX_PIXELS) return -1;
    if (top + height > cinfo->image_height || left + width > cinfo->image_width) return -1; /* 64-bit: no wrap */
    cinfo->out_color_space = JCS_RGB;
    cinfo->scale_num = 1;
    cinfo->scale_denom = scale_denom;
    cinfo->dct_method = JDCT_IFAST; /* as FFCV's own decoder (TJFLAG_FASTDCT) */
    jpeg_start_decompress(cinfo);

    double d = scale_denom, y_begin = top / d, y_end = (top + height) / d;
    double x_begin = left / d, x_end = (left + width) / d;
    JDIMENSION y0 = (JDIMENSION)y_begin, y1 = (JDIMENSION)ceil(y_end), x0 = (JDIMENSION)x_begin;
    JDIMENSION x1 = (JDIMENSION)ceil(x_end);
    if (y1 > cinfo->output_height) y1 = cinfo->output_height;
    if (x1 > cinfo->output_width) x1 = cinfo->output_width;
    if (y0 >= y1 || x0 >= x1 || y_end > y1 || x_end > x1) return -1;
    /* Decoding starts and stops at least a pixel beyond the region where the image goes on (libjpeg moves the
     * start to a block edge; the end goes one block on): the edge columns' chroma is upsampled from their
     * neighbours, as in the whole image, not from copies of themselves. */
    JDIMENSION start = x0 > 0 ? x0 - 1 : 0;
    JDIMENSION cols = (x1 + 16 < cinfo->output_width ? x1 + 16 : cinfo->output_width) - start;
    if (cols < cinfo->output_width) jpeg_crop_scanline(cinfo, &start, &cols); /* start moves to a block edge */
    if ((uint64_t)(y1 - y0) * cols * 3 > capacity) return -1;
    if (y0 > 0) jpeg_skip_scanlines(cinfo, y0);
    while (cinfo->output_scanline < y1) {
        JSAMPROW row = dst + (uint64_t)(cinfo->output_scanline - y0) * cols * 3;
        jpeg_read_scanlines(cinfo, &row, 1);
    }
    /* the rows below the region are never decoded */
    if (cinfo->err->num_warnings) return -1; /* corrupt data in the rows decoded (or skipped over) */
    double out[6] = {y1 - y0, cols, y_begin - y0, y_end - y0, x_begin - start, x_end - start};
    for (int k = 0; k < 6; k++) region[k] = out[k];
    return 0;
}

/* The region is (top, left, height, width) in full-size pixels, at least one pixel each way and inside the image;
 * scale_denom is 1, 2, 4 or 8. The decoded pixels fill dst (capacity bytes) as a (rows, cols, 3) RGB array, a
 * little larger than the region at that scale (whole pixels, and columns from a block edge); region[] receives
 * rows, cols, and the region's exact bounds in it: first row, end row, first column, end column (fractional when
 * shrunk). Returns 0, or -1 for any other argument, a dst too small, a JPEG libjpeg cannot decode (or decodes with
 * a warning: corrupt data), one that does not define its own tables, or one over MAX_PIXELS. Each call has its own decompressor, so a result never
 * depends on what the thread decoded before. */
int decode_region(const unsigned char *src, uint64_t size, unsigned char *dst, uint64_t capacity, uint32_t top,
                  uint32_t left, uint32_t height, uint32_t width, uint32_t scale_denom, double *region) {
    if (src == NULL || dst == NULL || region == NULL || size < 4 || height == 0 ||
        width == 0 || !(scale_denom == 1 || scale_denom == 2 || scale_denom == 4 || scale_denom == 8))
        return -1;
    struct jpeg_decompress_struct cinfo;
    struct error_manager errors;
    cinfo.err = jpeg_std_error(&errors.pub);
    errors.pub.error_exit = on_error;
    errors.pub.output_message = on_message;
    if (setjmp(errors.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    struct jpeg_progress_mgr progress = {.progress_monitor = on_progress};
    cinfo.progress = &progress;
    int status = decode_with(&cinfo, src, size, dst, capacity, top, left, height, width, scale_denom, region);
    jpeg_destroy_decompress(&cinfo);
    return status;
}

/* One axis of an area resize of the span [begin, end) of an axis `extent` pixels long to `out` pixels: output i
 * averages pixels [first[i], first[i] + count[i]) with weights[i * max_taps + k], each pixel's overlap with
 * [begin + i * scale, begin + (i + 1) * scale) over scale. */
static void area_taps(double begin, double end, int extent, int out, int max_taps, int *first, int *count,
                      float *weights) {
    double scale = (end - begin) / out;
    for (int i = 0; i < out; i++) {
        double a = begin + i * scale, b = begin + (i + 1) * scale;
        int k0 = (int)floor(a), k1 = (int)ceil(b - 1e-9);
        if (k1 > extent) k1 = extent;
        if (k1 - k0 > max_taps) k1 = k0 + max_taps; /* only a rounding sliver can be cut */
        first[i] = k0;
        count[i] = k1 - k0;
        for (int k = k0; k < k1; k++) {
            double lo = k > a ? k : a, hi = k + 1 < b ? k + 1 : b;
            weights[i * max_taps + (k - k0)] = (float)((hi - lo) / scale);
        }
    }
}

/* The span rows [y_begin, y_end) x columns [x_begin, x_end) of src, a (rows, cols, 3) RGB array, shrunk by
 * area averaging into dst (out_h, out_w, 3); the bounds may be fractional. Returns 0, or -1 (nothing written)
 * unless both sides shrink or stay, inside src, with finite bounds and sizes of at least one pixel. */
int resize_area(const unsigned char *src, int32_t rows, int32_t cols, double y_begin, double y_end, double x_begin,
                double x_end, unsigned char *dst, int32_t out_h, int32_t out_w) {
    /* written so that NaN fails every test: each comparison says what must hold */
    if (src == NULL || dst == NULL || rows < 1 || cols < 1 || out_h < 1 || out_w < 1 || !(y_begin >= 0) ||
        !(x_begin >= 0) || !(y_end <= rows) || !(x_end <= cols) || !(y_end - y_begin >= out_h) ||
        !(x_end - x_begin >= out_w))
        return -1;
    int taps_y = (int)ceil((y_end - y_begin) / out_h) + 2, taps_x = (int)ceil((x_end - x_begin) / out_w) + 2;
    int line_width = (int)ceil(x_end) - (int)x_begin;
    int *first_y = malloc(sizeof(int) * 2 * (size_t)(out_h + out_w));
    size_t floats = (size_t)out_h * taps_y + (size_t)out_w * taps_x + (size_t)line_width * 3;
    float *weights_y = malloc(sizeof(float) * floats);
    if (first_y == NULL || weights_y == NULL) {
        free(first_y);
        free(weights_y);
        return -1;
    }
    int *count_y = first_y + out_h, *first_x = count_y + out_h, *count_x = first_x + out_w;
    float *weights_x = weights_y + (size_t)out_h * taps_y, *line = weights_x + (size_t)out_w * taps_x;
    area_taps(y_begin, y_end, rows, out_h, taps_y, first_y, count_y, weights_y);
    area_taps(x_begin, x_end, cols, out_w, taps_x, first_x, count_x, weights_x);
    int col0 = (int)x_begin; /* line[] holds columns [col0, col0 + line_width) of the rows being averaged */
    size_t stride = (size_t)cols * 3;
    for (int i = 0; i < out_h; i++) {
        const float *wy = weights_y + (size_t)i * taps_y;
        const unsigned char *row = src + (size_t)first_y[i] * stride + (size_t)col0 * 3;
        for (int k = 0; k < line_width * 3; k++) line[k] = wy[0] * row[k];
        for (int t = 1; t < count_y[i]; t++) {
            row += stride;
            for (int k = 0; k < line_width * 3; k++) line[k] += wy[t] * row[k];
        }
        unsigned char *out = dst + (size_t)i * out_w * 3;
        for (int j = 0; j < out_w; j++) {
            const float *wx = weights_x + (size_t)j * taps_x, *p = line + (size_t)(first_x[j] - col0) * 3;
            float r = 0, g = 0, b = 0;
            for (int t = 0; t < count_x[j]; t++, p += 3) {
                r += wx[t] * p[0];
                g += wx[t] * p[1];
                b += wx[t] * p[2];
            }
            /* each axis's weights sum to 1 (within a few float roundings), so a sum stays below 255.5 */
            out[3 * j] = (unsigned char)(r + 0.5f);
            out[3 * j + 1] = (unsigned char)(g + 0.5f);
            out[3 * j + 2] = (unsigned char)(b + 0.5f);
        }
    }
    free(first_y);
    free(weights_y);
    return 0;
}

/* The largest of 1, 2, 4, 8 that a crop can be shrunk by in the DCT and still cover the output twice
 * (crop_library.dct_scale). */
static uint32_t dct_scale(int64_t crop_h, int64_t crop_w, int32_t out_h, int32_t out_w) {
    uint32_t denom = 1;
    while (denom < 8 && crop_h >= 2 * (int64_t)denom * out_h && crop_w >= 2 * (int64_t)denom * out_w) denom *= 2;
    return denom;
}

/* Rows [y0, y0 + height) x columns [x0, x0 + width) of src, a (rows, cols, 3) RGB array, resized into dst
 * (out_h, out_w, 3) by bilinear interpolation at pixel centres, edges clamped: torch's interpolate with
 * align_corners=False. (Pillow's bilinear filter, on the photo backend's other paths, widens on an axis that
 * shrinks; this one does not: a crop enlarged one way and shrunk the other differs from theirs there.) */
static int resize_bilinear(const unsigned char *src, int64_t cols, int64_t y0, int64_t x0, int64_t height,
                           int64_t width, unsigned char *dst, int32_t out_h, int32_t out_w) {
    size_t *taps = malloc(sizeof(size_t) * 2 * (size_t)out_w);
    float *weights = malloc(sizeof(float) * (size_t)out_w);
    if (taps == NULL || weights == NULL) {
        free(taps);
        free(weights);
        return -1;
    }
    float scale_x = (float)width / out_w, scale_y = (float)height / out_h;
    for (size_t j = 0; j < (size_t)out_w; j++) {
        float x = (j + 0.5f) * scale_x - 0.5f;
        if (x < 0) x = 0;
        int64_t k = (int64_t)x;
        if (k > width - 1) k = width - 1;
        taps[2 * j] = (size_t)(x0 + k) * 3;
        taps[2 * j + 1] = (size_t)(x0 + (k + 1 < width ? k + 1 : k)) * 3;
        weights[j] = x - k;
    }
    size_t stride = (size_t)cols * 3;
    for (size_t i = 0; i < (size_t)out_h; i++) {
        float y = (i + 0.5f) * scale_y - 0.5f;
        if (y < 0) y = 0;
        int64_t k = (int64_t)y;
        if (k > height - 1) k = height - 1;
        float wy = y - k;
        const unsigned char *a = src + (size_t)(y0 + k) * stride;
        const unsigned char *b = src + (size_t)(y0 + (k + 1 < height ? k + 1 : k)) * stride;
        unsigned char *out = dst + (size_t)i * out_w * 3;
        for (size_t j = 0; j < (size_t)out_w; j++) {
            size_t l = taps[2 * j], r = taps[2 * j + 1];
            float wx = weights[j];
            for (int c = 0; c < 3; c++) {
                float upper = a[l + c] + wx * (a[r + c] - a[l + c]);
                float lower = b[l + c] + wx * (b[r + c] - b[l + c]);
                out[3 * j + c] = (unsigned char)(upper + wy * (lower - upper) + 0.5f);
            }
        }
    }
    free(taps);
    free(weights);
    return 0;
}

/* One record of crop_batch into out; *scratch (of *scratch_size bytes) grows to hold its decoded region. */
static int crop_one(const unsigned char *record, int64_t length, int jpeg, int64_t h, int64_t w, const int64_t *box,
                    unsigned char *out, int32_t out_h, int32_t out_w, unsigned char **scratch, size_t *scratch_size) {
    int64_t top = box[0], left = box[1], height = box[2], width = box[3];
    /* each side first, so that no product or sum below can overflow */
    if (h < 1 || w < 1 || (uint64_t)h > MAX_PIXELS || (uint64_t)w > MAX_PIXELS || (uint64_t)(h * w) > MAX_PIXELS ||
        height < 1 || width < 1 || height > h || width > w || top < 0 || left < 0 || top > h - height ||
        left > w - width)
        return -1;
    const unsigned char *src = record;
    int64_t rows = h, cols = w;
    double bounds[6] = {0, 0, (double)top, (double)(top + height), (double)left, (double)(left + width)};
    if (jpeg) {
        size_t need = (size_t)h * (size_t)w * 3;
        if (need > *scratch_size) {
            unsigned char *grown = realloc(*scratch, need);
            if (grown == NULL) return -1;
            *scratch = grown;
            *scratch_size = need;
        }
        if (decode_region(record, (uint64_t)length, *scratch, need, (uint32_t)top, (uint32_t)left,
                          (uint32_t)height, (uint32_t)width, dct_scale(height, width, out_h, out_w), bounds) != 0)
            return -1;
        src = *scratch;
        rows = (int64_t)bounds[0];
        cols = (int64_t)bounds[1];
    } else if (length != h * w * 3) {
        return -1;
    }
    if (height >= out_h && width >= out_w)
        return resize_area(src, (int32_t)rows, (int32_t)cols, bounds[2], bounds[3], bounds[4], bounds[5], out,
                           out_h, out_w);
    /* enlarged at least one way, so decoded at full scale (dct_scale 1): the bounds are whole pixels */
    return resize_bilinear(src, cols, (int64_t)bounds[2], (int64_t)bounds[4], (int64_t)(bounds[3] - bounds[2]),
                           (int64_t)(bounds[5] - bounds[4]), out, out_h, out_w);
}

/* n records of a mapped .beton (`base`, `base_size` bytes): record k is bytes [offsets[k], offsets[k] +
 * lengths[k]), JPEG when jpeg[k] is 1 else raw (h, w, 3) pixels, of (h, w) = (sizes[2k], sizes[2k + 1]); its crop
 * box boxes[4k..4k + 3] (top, left, height, width) goes to dst + k * out_h * out_w * 3, shrunk by the area
 * average (a JPEG decoded only in the box, shrunk in the DCT, as decode_region does) or enlarged bilinearly.
 * status[k] is 0, or -1 where the record was refused (its slot then holds anything). Returns how many were
 * refused, or -1 for arguments that describe no batch. */
int crop_batch(const unsigned char *base, uint64_t base_size, const int64_t *offsets, const int64_t *lengths,
               const uint8_t *jpeg, const int64_t *sizes, const int64_t *boxes, int32_t n, unsigned char *dst,
               int32_t out_h, int32_t out_w, int32_t *status) {
    if (base == NULL || offsets == NULL || lengths == NULL || jpeg == NULL || sizes == NULL || boxes == NULL ||
        dst == NULL || status == NULL || n < 0 || out_h < 1 || out_w < 1)
        return -1;
    unsigned char *scratch = NULL;
    size_t scratch_size = 0, slot = (size_t)out_h * (size_t)out_w * 3;
    int refused = 0;
    for (int32_t k = 0; k < n; k++) {
        int64_t offset = offsets[k], length = lengths[k];
        if (offset < 0 || length < 1 || (uint64_t)offset > base_size || (uint64_t)length > base_size - offset)
            status[k] = -1;
        else
            status[k] = crop_one(base + offset, length, jpeg[k], sizes[2 * k], sizes[2 * k + 1], boxes + 4 * k,
                                 dst + (size_t)k * slot, out_h, out_w, &scratch, &scratch_size);
        refused += status[k] != 0;
    }
    free(scratch);
    return refused;
}
