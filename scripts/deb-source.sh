# shellcheck shell=bash
# Sourced by the scripts that run another project's test suite from its
# Debian source package (scripts/qemu-iotests, scripts/libnbd-interop).
#
# ensure_deb_src PROG: adds a deb-src entry matching the Debian archive apt
# already uses, unless there is one; returns 1 if nothing was added. PROG
# names the caller in the message.
ensure_deb_src() {
  local prog=$1 sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
  local existing=()
  for f in "${files[@]}"; do [[ -f $f ]] && existing+=("$f"); done
  if ((${#existing[@]})) &&
     grep -qsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' "${existing[@]}"; then
    return 1  # nothing added
  fi
  local codename uri=""
  # shellcheck disable=SC1091
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  # The URI of the first "deb" entry for the release itself: deb822 stanzas
  # (Types/URIs/Suites) or one-line "deb URI SUITE COMPONENTS" entries.
  for f in "${existing[@]}"; do
    uri=$(awk -v suite="$codename" '
      /^[[:space:]]*deb[[:space:]]/ {
        i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
        if ($(i + 1) == suite) { print $i; exit }
      }
      /^[[:space:]]*$/ { if (deb && s && u != "") { print u; exit } deb = 0; s = 0; u = "" }
      /^Types:/ { deb = ($0 ~ /[[:space:]]deb([[:space:]]|$)/) }
      /^URIs:/ { u = $2 }
      /^Suites:/ { for (j = 2; j <= NF; j++) if ($j == suite) s = 1 }
      END { if (deb && s && u != "") print u }' "$f" | head -n1)
    [[ -n $uri ]] && break
  done
  uri=${uri:-http://deb.debian.org/debian}
  echo "$prog: adding a deb-src entry for $codename ($uri)" >&2
  $sudo tee /etc/apt/sources.list.d/layerd-deb-src.sources >/dev/null <<EOF
# Added by layerd's scripts (qemu-iotests, libnbd-interop): source packages
# whose test suites they run.
Types: deb-src
URIs: $uri
Suites: $codename
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  return 0
}
