/* Decode one region of a JPEG, optionally at 1/2, 1/4 or 1/8 scale, for the FFCV backend's crop decoders
 * (pipelines/jpeg_region.py). FFCV 1.0.2 decodes every JPEG whole before cropping; here the rows below the
 * region are never read, the rows above it are skipped (entropy-decoded only), the columns beside it are
 * not inverse-transformed or colour-converted (libjpeg-turbo's jpeg_skip_scanlines/jpeg_crop_scanline),
 * and libjpeg's DCT scaling shrinks a large region while decoding it.
 *
 * Plain C over the libjpeg API (libjpeg-turbo >= 1.5), loaded with ctypes and called from FFCV's compiled
 * worker threads, each with its own reused decompressor. */
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>

#include <jpeglib.h>

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void on_error(j_common_ptr cinfo) { longjmp(((struct error_manager *)cinfo->err)->jump, 1); }

static void on_message(j_common_ptr cinfo) { (void)cinfo; } /* warnings stay quiet; errors return -1 */

static __thread struct jpeg_decompress_struct decompressor;
static __thread struct error_manager errors;
static __thread int initialised;

/* The region is (top, left, height, width) in full-size pixels; scale_denom is 1, 2, 4 or 8. The decoded
 * pixels fill dst (capacity bytes) as a (rows, cols, 3) RGB array, rows and cols returned in shape[0] and
 * shape[1]; the region is every row of it and its columns [shape[2], shape[3]) (a little wider than asked:
 * decoding starts at a block boundary). Returns 0, or -1 for a JPEG libjpeg cannot decode or a dst too
 * small. */
int decode_region(const unsigned char *src, uint64_t size, unsigned char *dst, uint64_t capacity, uint32_t top,
                  uint32_t left, uint32_t height, uint32_t width, uint32_t scale_denom, int32_t *shape) {
    struct jpeg_decompress_struct *cinfo = &decompressor;
    if (!initialised) {
        cinfo->err = jpeg_std_error(&errors.pub);
        errors.pub.error_exit = on_error;
        errors.pub.output_message = on_message;
        jpeg_create_decompress(cinfo);
        initialised = 1;
    }
    if (setjmp(errors.jump)) {
        jpeg_abort_decompress(cinfo);
        return -1;
    }
    jpeg_mem_src(cinfo, src, (unsigned long)size);
    jpeg_read_header(cinfo, TRUE);
    cinfo->out_color_space = JCS_RGB;
    cinfo->scale_num = 1;
    cinfo->scale_denom = scale_denom;
    cinfo->dct_method = JDCT_IFAST; /* as FFCV's own decoder (TJFLAG_FASTDCT) */
    jpeg_start_decompress(cinfo);

    uint32_t half = scale_denom / 2; /* the region's edges, rounded to the nearest pixel at the decoded scale */
    JDIMENSION y0 = (top + half) / scale_denom, x0 = (left + half) / scale_denom;
    JDIMENSION y1 = (top + height + half) / scale_denom, x1 = (left + width + half) / scale_denom;
    if (y1 > cinfo->output_height) y1 = cinfo->output_height;
    if (x1 > cinfo->output_width) x1 = cinfo->output_width;
    if (y0 >= y1 || x0 >= x1) {
        jpeg_abort_decompress(cinfo);
        return -1;
    }
    JDIMENSION start = x0, cols = x1 - x0;
    if (cols < cinfo->output_width) jpeg_crop_scanline(cinfo, &start, &cols); /* start moves to a block edge */
    if ((uint64_t)(y1 - y0) * cols * 3 > capacity) {
        jpeg_abort_decompress(cinfo);
        return -1;
    }
    if (y0 > 0) jpeg_skip_scanlines(cinfo, y0);
    while (cinfo->output_scanline < y1) {
        JSAMPROW row = dst + (uint64_t)(cinfo->output_scanline - y0) * cols * 3;
        jpeg_read_scanlines(cinfo, &row, 1);
    }
    jpeg_abort_decompress(cinfo); /* the rows below the region are never decoded */
    shape[0] = (int32_t)(y1 - y0);
    shape[1] = (int32_t)cols;
    shape[2] = (int32_t)(x0 - start);
    shape[3] = (int32_t)(x1 - start);
    return 0;
}
