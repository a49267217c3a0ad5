#!/usr/bin/env bash
# Create a throw-away certificate authority and certificates for a Dask cluster over tls://.
#
#   cluster/make-tls-certs.sh DIR [HOST ...]
#
# Writes into DIR (created if needed):
#   ca.pem / ca-key.pem                 the self-signed CA (keep ca-key.pem private)
#   scheduler.pem / scheduler-key.pem   for `dask scheduler --tls-ca-file --tls-cert --tls-key`
#   worker.pem / worker-key.pem         for `dask worker ...` with the same options
#   client.pem / client-key.pem         for `pipeline train --tls-ca-file --tls-cert --tls-key`
#
# Every certificate is signed by the CA and valid for both TLS server and client use (Dask
# authenticates both ends). Dask checks the signature but not the host name, so the HOST
# arguments (default: localhost 127.0.0.1) only fill the subjectAltName for other tools.
#
# FOR TESTING ONLY: unencrypted keys, 30 days of validity, one CA that signs everything. In
# production use certificates from your organisation's CA and protect the keys.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -lt 1 ]] && exit 2 || exit 0
fi
command -v openssl >/dev/null || { echo "error: openssl is not installed" >&2; exit 1; }

dir=$1
shift
hosts=("$@")
[[ ${#hosts[@]} -eq 0 ]] && hosts=(localhost 127.0.0.1)
days=${DAYS:-30}

san=""
for h in "${hosts[@]}"; do
    if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san=${san%,}

mkdir -p "$dir"
umask 077
cd "$dir"

openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
    -keyout ca-key.pem -out ca.pem -subj "/CN=pipeline test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

cat > leaf.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
EOF

for role in scheduler worker client; do
    openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$role-key.pem" -out "$role.csr" \
        -subj "/CN=pipeline-$role" 2>/dev/null
    openssl x509 -req -in "$role.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
        -days "$days" -sha256 -extfile leaf.ext -out "$role.pem" 2>/dev/null
    openssl verify -CAfile ca.pem "$role.pem" >/dev/null
    rm -f "$role.csr"
done
rm -f leaf.ext ca.srl
chmod 600 ./*-key.pem
chmod 644 ca.pem scheduler.pem worker.pem client.pem
echo "certificates for ${hosts[*]} in $(pwd): ca.pem, {scheduler,worker,client}.pem and *-key.pem"
