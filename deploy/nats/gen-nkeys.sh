#!/usr/bin/env bash
# Makes one NKey per Kagzi identity for nats-secure.conf.
#
#   deploy/nats/gen-nkeys.sh OUT_DIR
#
# writes OUT_DIR/<identity>.nk (the seed: the secret the service holds, mode 0600; give
# it to the service as NATS_NKEY_SEED) for scheduler, timer, executor, client, operator
# and the example tenant identity tenant_a, and OUT_DIR/nkeys.env with the public keys as KAGZI_NKEY_<IDENTITY>=U…, the
# environment nats-server needs. Public keys are not secret; seeds are. An existing seed
# is kept, so running it again only fills in what is missing (delete a seed to rotate it).
#
# The keys come from nk (github.com/nats-io/nkeys/nk); set NK to a built nk, else it
# runs through `go run`.
set -euo pipefail

out=${1:?usage: gen-nkeys.sh OUT_DIR}
nk_version=v0.4.16

nk() {
	if [[ -n "${NK:-}" ]]; then
		"$NK" "$@"
	else
		go run "github.com/nats-io/nkeys/nk@${nk_version}" "$@"
	fi
}

umask 077
mkdir -p "$out"
env_file="$out/nkeys.env"
: >"$env_file.tmp"
for id in scheduler timer executor client operator tenant_a; do
	seed_file="$out/$id.nk"
	if [[ ! -s "$seed_file" ]]; then
		nk -gen user >"$seed_file.tmp" 2>&1
		grep -q '^SU' "$seed_file.tmp" || { echo "gen-nkeys: nk produced no user seed for $id" >&2; exit 1; }
		mv "$seed_file.tmp" "$seed_file"
	fi
	pub=$(nk -inkey "$seed_file" -pubout 2>&1 | grep '^U' || true)
	[[ -n "$pub" ]] || { echo "gen-nkeys: no public key for $id" >&2; exit 1; }
	echo "KAGZI_NKEY_${id^^}=$pub" >>"$env_file.tmp"
done
chmod 0644 "$env_file.tmp"
mv "$env_file.tmp" "$env_file"
echo "seeds in $out/*.nk (keep secret); public keys in $env_file"
