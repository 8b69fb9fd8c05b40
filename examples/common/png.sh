# Sourced by the examples' run.sh: png SVG PNG converts a chart with rsvg-convert or
# ImageMagick's convert, whichever is installed; fails (status 1) when neither works.
png() {
  if command -v rsvg-convert >/dev/null; then rsvg-convert -o "$2" "$1"
  elif command -v convert >/dev/null; then convert "$1" "$2"
  else return 1; fi
}
