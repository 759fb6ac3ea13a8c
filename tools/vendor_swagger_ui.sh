#!/usr/bin/env bash
# Refresh the Swagger UI that /v2/docs serves from the server itself (no CDN: the docs work
# on hosts without internet access). Files come from npm's swagger-ui-dist package.
#
#   tools/vendor_swagger_ui.sh [VERSION]     (default: the version below)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-5.35.0}
DEST=server/salvo/frontends/http/swagger-ui
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
(cd "$SCRATCH" && npm pack --silent "swagger-ui-dist@$VERSION" >/dev/null && tar xzf ./*.tgz)
rm -rf "$DEST"
mkdir -p "$DEST"
for file in swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css \
    favicon-32x32.png LICENSE NOTICE; do
    cp "$SCRATCH/package/$file" "$DEST/"
done
echo "$VERSION" >"$DEST/VERSION"
echo "Swagger UI $VERSION in $DEST"
