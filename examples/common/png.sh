# Sourced by the examples' run.sh: png_copy CHART.svg writes CHART.png beside it with
# rsvg-convert or ImageMagick's convert, whichever is installed and works, and says which.
png_copy() {
  local png=${1%.svg}.png ok=1
  if command -v rsvg-convert >/dev/null; then rsvg-convert -o "$png" "$1" 2>/dev/null || ok=0
  elif command -v convert >/dev/null; then convert "$1" "$png" 2>/dev/null || ok=0
  else ok=0; fi
  if [ $ok = 1 ]; then
    echo "chart: $png"
  else
    rm -f "$png"
    echo "(no PNG copy: install librsvg2-bin for rsvg-convert)"
  fi
}
