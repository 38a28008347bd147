#!/usr/bin/env bash
# Checks that every `unsafe` in src/**/*.rs (block, fn, impl, extern) carries a justification
# a reviewer can check: the line itself or one of the 6 lines above it must contain
# `SAFETY:` (or `# Safety`, for the doc of an unsafe fn). Prints file:line of each offender.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t files < <(find src -name '*.rs' | sort)

awk -v q="'" '
# The code of `line`: comments and the contents of string and char literals removed. A
# string or block comment left open carries over to the next line (closer, raw, in_block).
function code_of(line,    out, i, n, rest) {
    out = ""
    i = 1
    while (i <= length(line)) {
        rest = substr(line, i)
        if (in_block) {                                  # inside /* ... */
            if (rest ~ /^\*\//) { in_block = 0; i += 2 } else i++
        } else if (closer != "") {                       # inside a string literal
            if (!raw && rest ~ /^\\/) i += 2
            else if (substr(rest, 1, length(closer)) == closer) { i += length(closer); closer = "" }
            else i++
        } else if (rest ~ /^\/\//) {                     # line comment: ignore the rest
            break
        } else if (rest ~ /^\/\*/) {
            in_block = 1; i += 2
        } else if (match(rest, /^r#*"/)) {               # raw string: r"..", r#".."#, br#".."#
            raw = 1; closer = "\"" substr(rest, 2, RLENGTH - 2); i += RLENGTH
        } else if (rest ~ /^"/) {                        # string: "..", b"..", c".."
            raw = 0; closer = "\""; i++
        } else if (substr(rest, 1, 1) == q && substr(rest, 3, 1) == q) {
            i += 3                                       # char literal: 'x'
        } else if (substr(rest, 1, 1) == q && substr(rest, 2, 1) == "\\" && (n = index(substr(rest, 4), q))) {
            i += 3 + n                                   # char literal: '\n', '\'', '\u{..}'
        } else {
            out = out substr(rest, 1, 1); i++            # code (or a lifetime)
        }
    }
    return out
}

FNR == 1 { closer = ""; raw = 0; in_block = 0; split("", recent) }

{
    if (code_of($0) ~ /(^|[^A-Za-z0-9_])unsafe([^A-Za-z0-9_]|$)/) {
        justified = ($0 ~ /SAFETY:|# Safety/)
        for (k = 1; k <= 6; k++)
            if ((FNR - k) in recent && recent[FNR - k] ~ /SAFETY:|# Safety/) justified = 1
        if (!justified) {
            text = $0
            sub(/^[ \t]+/, "", text)
            print FILENAME ":" FNR ": " text
            offenders++
        }
    }
    recent[FNR] = $0
    delete recent[FNR - 6]
}

END {
    if (offenders) {
        print offenders " unsafe use(s) without SAFETY: (or a # Safety doc section) in the 6 lines above" > "/dev/stderr"
        exit 1
    }
}
' "${files[@]}"
