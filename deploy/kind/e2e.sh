#!/usr/bin/env bash
# End-to-end check of svcproxy on a kind cluster without kube-proxy.
#
#   deploy/kind/e2e.sh            # from anywhere; needs docker, kind and kubectl on PATH
#
# Creates the cluster in cluster.yaml (1 control-plane + 2 workers, kubeProxyMode: none), builds
# the image, loads it into the nodes, applies the kind overlay, and checks that Services work:
# the `kubernetes` Service (CoreDNS reaches the API through it), a ClusterIP from a pod, a
# NodePort from another node, and DNS from a pod. The cluster is deleted on exit, pass or fail
# (KEEP_CLUSTER=1 keeps it for a look).
#
# DNS goes over UDP through svcproxy; the check is required (SVCPROXY_E2E_REQUIRE_DNS=0 turns a
# failure into a warning, e.g. to look at the rest while debugging DNS).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cluster="$(sed -n 's/^name: *//p' "$here/cluster.yaml")"
image="svcproxy:dev"
ctx="kind-$cluster"
require_dns="${SVCPROXY_E2E_REQUIRE_DNS:-1}"
timeout="${E2E_TIMEOUT:-180s}"
# Test images, pinned.
nginx_image="nginx:1.27-alpine"
curl_image="curlimages/curl:8.11.1"
dns_image="busybox:1.37"

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }
k() { kubectl --context "$ctx" "$@"; }

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || fail "$tool is not on PATH"
done

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    step "failed (exit $rc): svcproxy logs"
    k -n kube-system logs -l app.kubernetes.io/name=svcproxy --tail=50 --prefix 2>/dev/null || true
  fi
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    step "KEEP_CLUSTER=1: leaving cluster $cluster (delete: kind delete cluster --name $cluster)"
  else
    step "deleting kind cluster $cluster"
    kind delete cluster --name "$cluster" || true
  fi
  exit "$rc"
}

if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  fail "a kind cluster named $cluster exists already; delete it first: kind delete cluster --name $cluster"
fi

trap cleanup EXIT
step "creating kind cluster $cluster from $here/cluster.yaml (kubeProxyMode: none)"
kind create cluster --config "$here/cluster.yaml"

step "building $image from $repo"
docker build -t "$image" "$repo"

step "loading $image into the kind nodes"
kind load docker-image "$image" --name "$cluster"

step "applying the kind overlay (deploy/kind: deploy/base + image $image + SVCPROXY_APISERVER)"
k apply -k "$here"

step "waiting for the svcproxy DaemonSet rollout"
k -n kube-system rollout status daemonset/svcproxy --timeout="$timeout"
k -n kube-system get pods -l app.kubernetes.io/name=svcproxy -o wide

step "waiting for the nodes to be Ready"
k wait --for=condition=Ready nodes --all --timeout="$timeout"

step "waiting for CoreDNS (it reaches the API server through the kubernetes Service, i.e. svcproxy)"
k -n kube-system rollout status deployment/coredns --timeout="$timeout"

step "deploying nginx (2 replicas) with a ClusterIP and a NodePort Service"
k create deployment nginx --image="$nginx_image" --replicas=2 --port=80
k expose deployment nginx --name=nginx --port=80 --target-port=80 --type=ClusterIP
k expose deployment nginx --name=nginx-np --port=80 --target-port=80 --type=NodePort
k rollout status deployment/nginx --timeout="$timeout"
cluster_ip="$(k get service nginx -o jsonpath='{.spec.clusterIP}')"
node_port="$(k get service nginx-np -o jsonpath='{.spec.ports[0].nodePort}')"
echo "nginx clusterIP $cluster_ip, nodePort $node_port"

api_ip="$(k get service kubernetes -o jsonpath='{.spec.clusterIP}')"
step "the kubernetes Service from a pod: https://$api_ip/livez"
k run curl-api --image="$curl_image" --restart=Never --rm -i --quiet --command -- \
  curl -fsSk --max-time 5 --retry 5 --retry-connrefused "https://$api_ip/livez" \
  || fail "the kubernetes Service ($api_ip:443) is not reachable from a pod"

step "ClusterIP from a pod: 10 requests to http://$cluster_ip/"
k run curl --image="$curl_image" --restart=Never --rm -i --quiet --command -- \
  sh -c "for i in \$(seq 10); do curl -fsS -o /dev/null --max-time 5 --retry 5 --retry-connrefused http://$cluster_ip/ || exit 1; done; echo 10/10 ok" \
  || fail "ClusterIP $cluster_ip not reachable from a pod"

step "round robin: both nginx pods served requests"
for pod in $(k get pods -l app=nginx -o name); do
  hits="$(k logs "$pod" | grep -c '"GET / ' || true)"
  echo "$pod: $hits requests"
  [ "$hits" -gt 0 ] || fail "$pod got no request through the ClusterIP"
done

step "NodePort from outside the pod network: from node ${cluster}-control-plane to each worker's InternalIP:$node_port"
for node in $(k get nodes -l '!node-role.kubernetes.io/control-plane' -o name); do
  ip="$(k get "$node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')"
  echo "curl http://$ip:$node_port/ (${node#node/})"
  docker exec "${cluster}-control-plane" curl -fsS -o /dev/null --max-time 5 --retry 5 --retry-connrefused \
    "http://$ip:$node_port/" || fail "NodePort $ip:$node_port not reachable"
done

step "clusterIP:nodePort is refused (as with kube-proxy)"
rc=0
docker exec "${cluster}-control-plane" curl -sS -o /dev/null --max-time 5 "http://$cluster_ip:$node_port/" || rc=$?
[ "$rc" = 7 ] || fail "$cluster_ip:$node_port: curl exit $rc; want 7 (connection refused)"
echo "refused, as expected"

step "DNS from a pod: nslookup kubernetes.default (UDP to the kube-dns Service)"
# The FQDN, since busybox's nslookup is unreliable with search domains.
if k run dns --image="$dns_image" --restart=Never --rm -i --quiet --command -- \
     timeout 20 nslookup kubernetes.default.svc.cluster.local; then
  echo "DNS works"
elif [ "$require_dns" = 1 ]; then
  fail "DNS through the kube-dns Service failed (SVCPROXY_E2E_REQUIRE_DNS=1)"
else
  echo "WARNING: DNS through the kube-dns Service failed (not required: SVCPROXY_E2E_REQUIRE_DNS=0)."
fi

step "PASS: svcproxy serves ClusterIP and NodePort Services on kind"
