#!/usr/bin/env bash
# Take llama.cpp's own GGUF converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their `conversion`
# package and the matching gguf-py) from the llama-cpp-python source distribution pinned in requirements.txt,
# into vendor/llama.cpp-converters/ (git-ignored: they are llama.cpp's files, not ours to commit).
# Runs once; a stamp file holds the version so a new pin fetches again. Usage: scripts/fetch_llama_converters.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON_BIN:-python}"
version=$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' requirements.txt | head -1)
[ -n "$version" ] || { echo "fetch_llama_converters: no llama-cpp-python==X pin in requirements.txt" >&2; exit 1; }
target=vendor/llama.cpp-converters
if [ -f "$target/VERSION" ] && [ "$(cat "$target/VERSION")" = "$version" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sdist="${LLAMA_CPP_SDIST:-}"
if [ -z "$sdist" ]; then
  echo "fetching llama.cpp's GGUF converters from the llama-cpp-python $version source distribution"
  "$python" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work"
  sdist=$(ls "$work"/llama_cpp_python-"$version".tar.gz)
fi
prefix="llama_cpp_python-$version/vendor/llama.cpp"
tar -xzf "$sdist" -C "$work" "$prefix/convert_hf_to_gguf.py" "$prefix/convert_lora_to_gguf.py" \
  "$prefix/conversion" "$prefix/gguf-py/gguf" "$prefix/LICENSE"
rm -rf "$target.tmp"
mkdir -p "$target.tmp"
cp -r "$work/$prefix"/. "$target.tmp"/
echo "$version" > "$target.tmp/VERSION"
rm -rf "$target"
mv "$target.tmp" "$target"
echo "llama.cpp converters ($version) are in $target"
