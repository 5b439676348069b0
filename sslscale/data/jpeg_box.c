/* Decode only a box of a JPEG with libjpeg-turbo (sslscale.data.jpeg_box).
 *
 * libjpeg-turbo >= 1.5 decodes part of an image: jpeg_crop_scanline() limits the inverse DCT,
 * upsampling and color conversion to the columns of the box (widened to whole iMCUs),
 * jpeg_skip_scanlines() skips the inverse DCT of the rows above it, and stopping after its last
 * row skips everything below (TensorFlow's decode_and_crop_jpeg works the same way). The pixels
 * are those of the whole image decoded at the same scale (accurate integer IDCT, fancy
 * upsampling: libjpeg's defaults, which PIL and simplejpeg use too). Errors and libjpeg's
 * warnings (corrupt data) return -1 with libjpeg's message; the caller then lets PIL decode (or
 * report) the file.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

struct box_error {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
};

static void box_error_exit(j_common_ptr cinfo) {
  longjmp(((struct box_error *)cinfo->err)->jump, 1);
}

static void box_emit_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level < 0) /* a warning: corrupt data, as strict decoders treat it */
    longjmp(((struct box_error *)cinfo->err)->jump, 1);
}

/* The image's width, height and libjpeg color space into info[0..2]; with out != NULL, then rows
 * y0..y1-1 and at least the columns x0..x1-1 of the image decoded at 1/scale_denom (box in the
 * pixels of that scaled image), 1 (gray) or 3 (RGB) channels, into out: row r of the box at
 * out + r * out_stride, starting at column *x_start (<= x0, whole iMCUs). Returns 0; 1 for color
 * spaces left to PIL (CMYK, YCCK; nothing decoded); -1 with libjpeg's message in err. */
int sslscale_jpeg_decode_box(const unsigned char *data, unsigned long size, int *info,
                             int scale_denom, int gray, int x0, int y0, int x1, int y1,
                             unsigned char *out, long out_stride, int *x_start, char *err,
                             int err_size) {
  struct jpeg_decompress_struct cinfo;
  struct box_error jerr;
  cinfo.err = jpeg_std_error(&jerr.pub);
  jerr.pub.error_exit = box_error_exit;
  jerr.pub.emit_message = box_emit_message;
  if (setjmp(jerr.jump)) {
    (*cinfo.err->format_message)((j_common_ptr)&cinfo, err);
    err[err_size - 1] = 0;
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  info[0] = (int)cinfo.image_width;
  info[1] = (int)cinfo.image_height;
  info[2] = (int)cinfo.jpeg_color_space;
  if (out == NULL || cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    return out == NULL ? 0 : 1;
  }
  cinfo.out_color_space = gray ? JCS_GRAYSCALE : JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = (unsigned int)scale_denom;
  jpeg_start_decompress(&cinfo);
  if (x0 < 0 || y0 < 0 || x1 <= x0 || y1 <= y0 || x1 > (int)cinfo.output_width ||
      y1 > (int)cinfo.output_height) {
    snprintf(err, err_size, "box (%d, %d, %d, %d) outside the %ux%u image", x0, y0, x1, y1,
             cinfo.output_width, cinfo.output_height);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  /* One column more on each side: chroma upsampling of the box's edge pixels reads the chroma
   * samples beyond them, which a region ending at the box would replace by its own edge's. */
  JDIMENSION x = (JDIMENSION)(x0 > 0 ? x0 - 1 : 0);
  JDIMENSION width = (JDIMENSION)(x1 < (int)cinfo.output_width ? x1 + 1 : x1) - x;
  if (width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &x, &width);
  if (y0 > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
  while (cinfo.output_scanline < (JDIMENSION)y1) {
    JSAMPROW row = out + (long)(cinfo.output_scanline - (JDIMENSION)y0) * out_stride;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_abort_decompress(&cinfo); /* the rows below the box are never decoded */
  jpeg_destroy_decompress(&cinfo);
  *x_start = (int)x;
  return 0;
}
