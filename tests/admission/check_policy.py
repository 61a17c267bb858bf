#!/usr/bin/env python3
"""Evaluates the pod-identity-injection MutatingAdmissionPolicy's CEL outside a cluster.

Run from the repository root: python3 tests/admission/check_policy.py
Needs: cel-python (import celpy), PyYAML (import yaml), kubernetes-validate
(import kubernetes_validate; its bundled JSON schemas drive the merge model below).

What is evaluated, with celpy:
  * the match condition, against pods in and out of the params ConfigMap's list;
  * the variables, then every mutation expression, applied in order to sample pods:
    JSONPatch results with an RFC 6902 `add` written here, ApplyConfiguration results with a
    merge driven by the Pod schema's x-kubernetes-list-type / list-map-keys / map-type
    annotations (the ones the API server's structured merge reads);
  * the API server's own checks on mutation results that can be reproduced: Object{} type
    names must follow the field path (CheckTypeNamesMatchFieldPathNames), apply configurations
    may hold no atomic list, map or struct (validatePatch), Object types exist in mutation
    expressions only (variables and match conditions are compiled without them);
  * the mutated pods against the Pod schema (kubernetes-validate, strict).
What is not: see NOT_CHECKED, printed at the end.
"""

import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "deploy/kubernetes/admission/v1/policy.yaml"
BINDING = ROOT / "deploy/kubernetes/admission/v1/binding.yaml"
PARAMS = ROOT / "deploy/kubernetes/overlays/sts/pod-identity-injection.yaml"
ASSOCIATIONS = ROOT / "deploy/kubernetes/overlays/sts/associations.yaml"

TOKEN_DIR = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount"
EXPECTED_ENV = {
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": TOKEN_DIR + "/eks-pod-identity-token",
}
EXPECTED_VOLUME = {
    "name": "eks-pod-identity-token",
    "projected": {
        "sources": [
            {
                "serviceAccountToken": {
                    "audience": "pods.eks.amazonaws.com",
                    "expirationSeconds": 86400,
                    "path": "eks-pod-identity-token",
                }
            }
        ]
    },
}
EXPECTED_MOUNT = {"name": "eks-pod-identity-token", "mountPath": TOKEN_DIR, "readOnly": True}

NOT_CHECKED = """\
Not checked here (needs a real API server, e.g. kind or kubeadm with the API enabled):
  - Kubernetes' CEL compiler: static type checking (ternary branch types, homogeneous list and
    map literals), which functions and macros a given Kubernetes release offers, cost limits.
    celpy is another CEL implementation; its error and short-circuit behaviour may differ.
  - structured-merge-diff itself: the apply-configuration merge is modelled from the schema's
    annotations; JSON patches are applied by the RFC 6902 `add` written here.
  - The admission chain: matchConstraints, the binding's paramRef lookup (the ConfigMap is
    passed in directly; parameterNotFoundAction is only checked to be Allow), the order of
    admission plugins (ServiceAccount defaulting), when reinvocation happens, failurePolicy.
  - The mutations' effect on a running pod (the kubelet projecting the token) and the agent."""

failures = []
passes = []


def check(ok, what, detail=""):
    if ok:
        passes.append(what)
        print(f"ok   - {what}")
    else:
        failures.append(what)
        print(f"FAIL - {what}" + (f"\n       {detail}" if detail else ""))


def die(message):
    print(f"check_policy.py: {message}", file=sys.stderr)
    sys.exit(2)


try:
    import yaml
except ImportError:
    die("PyYAML is missing: pip install PyYAML")
try:
    import celpy
    import lark
    from celpy import celtypes
    from celpy.evaluation import CELEvalError, Evaluator
except ImportError:
    die("celpy is missing: pip install cel-python (imported as celpy)")
try:
    import importlib.resources as resources

    import kubernetes_validate
    from kubernetes_validate.utils import latest_version
except ImportError:
    die("kubernetes-validate is missing: pip install kubernetes-validate")


# --- CEL with Kubernetes' Object{} and JSONPatch{} constructors -------------------------------


class Typed(celtypes.MapType):
    """An Object.<path>{...} or JSONPatch{...} value: a map that remembers its type name."""

    type_name = ""


def dotted_name(tree):
    """`Object.spec.containers` for an identifier chain, None for anything else."""
    if isinstance(tree, lark.Token):
        return None
    if tree.data in ("member", "primary") and len(tree.children) == 1:
        return dotted_name(tree.children[0])
    if tree.data == "ident":
        return tree.children[0].value
    if tree.data == "member_dot":
        left = dotted_name(tree.children[0])
        return left and f"{left}.{tree.children[1].value}"
    return None


class TypeNotDeclared(Exception):
    pass


def evaluator_class(allow_types):
    class K8sEvaluator(Evaluator):
        def sub_evaluator(self, ast):
            return K8sEvaluator(ast, activation=self.activation)

        def member_object(self, tree):
            name = dotted_name(tree.children[0])
            if name and (name == "Object" or name.startswith("Object.") or name == "JSONPatch"):
                if not allow_types:
                    # The API server compiles variables and match conditions without these.
                    raise TypeNotDeclared(f"{name}{{...}} outside a mutation expression")
                fields = self.visit(tree.children[1]) if len(tree.children) > 1 else celtypes.MapType()
                if isinstance(fields, CELEvalError):
                    return fields
                value = Typed({celtypes.StringType(k): v for k, v in fields.items()})
                value.type_name = name
                return value
            return super().member_object(tree)

        def fieldinits(self, tree):
            # celpy 0.5 evaluates each field's expression node's children and keeps the first,
            # which for `field: c ? a : b` is the condition `c`; evaluate the node itself.
            fields = {}
            for ident, expr in zip(tree.children[0::2], tree.children[1::2]):
                if ident.value in fields:
                    raise ValueError(f"duplicate field {ident.value!r}")
                fields[ident.value] = self.visit(expr)
            return celtypes.MessageType(**fields)

    return K8sEvaluator


def runner_class(allow_types):
    cls = evaluator_class(allow_types)

    class Runner(celpy.InterpretedRunner):
        def evaluate(self, context):
            return cls(ast=self.ast, activation=self.new_activation()).evaluate(context)

    return Runner


PLAIN = celpy.Environment(runner_class=runner_class(False))
MUTATING = celpy.Environment(runner_class=runner_class(True))


def evaluate(env, expression, context):
    program = env.program(env.compile(expression))
    return program.evaluate({k: v if isinstance(v, celtypes.MapType) else celpy.json_to_cel(v) for k, v in context.items()})


def type_name_errors(value, path):
    """Kubernetes' CheckTypeNamesMatchFieldPathNames: Object.a.b{} only under field a.b."""
    errors = []
    if isinstance(value, Typed):
        if value.type_name != ".".join(path):
            errors.append(f"{value.type_name}{{}} at {'.'.join(path)}")
        for k, v in value.items():
            errors += type_name_errors(v, path + [str(k)])
    elif isinstance(value, list):
        for v in value:
            errors += type_name_errors(v, path)
    elif isinstance(value, celtypes.MapType):
        for v in value.values():
            errors += type_name_errors(v, path)
    return errors


def native(value):
    if value is None:
        return None
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, (celtypes.IntType, celtypes.UintType)):
        return int(value)
    if isinstance(value, celtypes.DoubleType):
        return float(value)
    if isinstance(value, celtypes.StringType):
        return str(value)
    if isinstance(value, list):  # celtypes.ListType, or a plain list from celpy's `+`
        return [native(v) for v in value]
    if isinstance(value, celtypes.MapType):
        return {str(k): native(v) for k, v in value.items()}
    raise TypeError(f"unexpected CEL value {value!r}")


# --- The Pod schema: merge model and atomic check ---------------------------------------------

VERSION = latest_version()
SCHEMA_DIR = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{VERSION}-local-strict"
DEFS = json.loads((SCHEMA_DIR / "_definitions.json").read_text())["$defs"]


def resolve(node):
    while "$ref" in node:
        node = DEFS[node["$ref"].split("/")[-1]]
    return node


POD = resolve({"$ref": "#/$defs/io.k8s.api.core.v1.Pod"})


def atomics(value, node, path="."):
    """validatePatch: the atomic lists, maps and structs an apply configuration holds."""
    node = resolve(node)
    found = []
    if isinstance(value, dict):
        if node.get("x-kubernetes-map-type") == "atomic":
            found.append(path)
        for k, v in value.items():
            sub = node.get("properties", {}).get(k) or node.get("additionalProperties")
            if isinstance(sub, dict):
                found += atomics(v, sub, f"{path}{k}.")
    elif isinstance(value, list):
        # Structured merge treats a list without x-kubernetes-list-type as atomic.
        if node.get("x-kubernetes-list-type", "atomic") == "atomic":
            found.append(path.rstrip("."))
        for v in value:
            found += atomics(v, node.get("items", {}), path)
    return found


def merge(live, patch, node):
    """The apply-configuration merge: structs and granular maps by key, list-maps by their keys,
    sets by value, everything else replaced."""
    node = resolve(node)
    if isinstance(patch, dict):
        out = dict(live) if isinstance(live, dict) else {}
        for k, v in patch.items():
            sub = node.get("properties", {}).get(k) or node.get("additionalProperties")
            if not isinstance(sub, dict):
                raise ValueError(f"field {k!r} is not in the schema")
            out[k] = merge(out.get(k), v, sub)
        return out
    if isinstance(patch, list):
        kind = node.get("x-kubernetes-list-type", "atomic")
        out = list(live) if isinstance(live, list) else []
        if kind == "map":
            keys = node["x-kubernetes-list-map-keys"]
            for item in patch:
                at = next((i for i, x in enumerate(out) if all(x.get(k) == item.get(k) for k in keys)), None)
                if at is None:
                    out.append(merge(None, item, node["items"]))
                else:
                    out[at] = merge(out[at], item, node["items"])
            return out
        if kind == "set":
            return out + [x for x in patch if x not in out]
        return patch
    return patch


def json_patch_add(doc, op):
    """RFC 6902 `add`, the only operation the policy emits."""
    if op.get("op") != "add":
        raise ValueError(f"unexpected JSON patch operation {op!r}")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    if isinstance(parent, list):
        if last == "-":
            parent.append(op["value"])
        else:
            parent.insert(int(last), op["value"])
    elif isinstance(parent, dict):
        parent[last] = op["value"]
    else:
        raise ValueError(f"cannot add at {op['path']}")


def omit_empty(value):
    """The pod as the API server serializes it: empty lists and nulls left out."""
    if isinstance(value, dict):
        return {k: omit_empty(v) for k, v in value.items() if v is not None and v != []}
    if isinstance(value, list):
        return [omit_empty(v) for v in value]
    return value


# --- The policy, its binding and parameters ---------------------------------------------------

policy = yaml.safe_load(POLICY.read_text())
binding = yaml.safe_load(BINDING.read_text())
params = yaml.safe_load(PARAMS.read_text())
associations = yaml.safe_load(ASSOCIATIONS.read_text())["associations"]
spec = policy["spec"]

print(f"policy {POLICY.relative_to(ROOT)}, params {PARAMS.relative_to(ROOT)}, Pod schema of Kubernetes {VERSION}")

check(policy["kind"] == "MutatingAdmissionPolicy" and binding["kind"] == "MutatingAdmissionPolicyBinding", "policy and binding kinds")
check(spec.get("paramKind") == {"apiVersion": "v1", "kind": "ConfigMap"}, "paramKind is ConfigMap v1")
check(spec.get("failurePolicy") == "Fail", "failurePolicy Fail")
check(spec.get("reinvocationPolicy") == "IfNeeded", "reinvocationPolicy IfNeeded")
rules = spec["matchConstraints"]["resourceRules"]
check(
    rules == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
    "matches pod CREATE only",
    f"{rules}",
)
ref = binding["spec"]["paramRef"]
check(binding["spec"]["policyName"] == policy["metadata"]["name"], "binding names the policy")
check(
    (ref.get("name"), ref.get("namespace")) == (params["metadata"]["name"], params["metadata"]["namespace"]),
    "binding's paramRef is the params ConfigMap",
    f"{ref} vs {params['metadata']}",
)
check(ref.get("parameterNotFoundAction") == "Allow", "a missing params ConfigMap skips the policy (Allow), it does not refuse every pod")
wanted = {f"{a['namespace']}.{a['serviceAccount']}": a["roleArn"] for a in associations}
check(params["data"] == wanted, "params ConfigMap lists exactly the associations (key namespace.serviceAccount, value roleArn)", f"{params['data']} vs {wanted}")
check(all("." not in k.split(".", 1)[0] and k.count(".") >= 1 for k in params["data"]), "params keys split at their first dot")

# --- Match conditions -------------------------------------------------------------------------


def pod(namespace, service_account=None, containers=None, init_containers=None, volumes=None):
    p = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": namespace}, "spec": {}}
    if service_account is not None:
        p["spec"]["serviceAccountName"] = service_account
    p["spec"]["containers"] = containers or [{"name": "app", "image": "app:1"}]
    if init_containers:
        p["spec"]["initContainers"] = init_containers
    if volumes:
        p["spec"]["volumes"] = volumes
    return p


def request(p):
    return {"operation": "CREATE", "namespace": p["metadata"]["namespace"], "name": p["metadata"]["name"], "kind": {"group": "", "version": "v1", "kind": "Pod"}}


def matches(p, param):
    context = {"object": p, "oldObject": None, "request": request(p), "params": param, "namespaceObject": {"metadata": {"name": p["metadata"]["namespace"]}}}
    results = []
    for condition in spec["matchConditions"]:
        results.append(bool(evaluate(PLAIN, condition["expression"], context)))
    return all(results)


with_default = copy.deepcopy(params)
with_default["data"]["payments.default"] = "arn:aws:iam::111122223333:role/payments-default"
with_dots = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": params["metadata"], "data": {"payments.api.v2": "arn:aws:iam::111122223333:role/x"}}
empty = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": params["metadata"]}

cases = [
    ("payments/api (associated) matches", pod("payments", "api"), params, True),
    ("search/indexer (associated) matches", pod("search", "indexer"), params, True),
    ("payments/other (service account not associated) does not match", pod("payments", "other"), params, False),
    ("search/api (associated name, other namespace) does not match", pod("search", "api"), params, False),
    ("payments without serviceAccountName (default not associated) does not match", pod("payments"), params, False),
    ("payments without serviceAccountName matches once payments.default is listed", pod("payments"), with_default, True),
    ("payments with serviceAccountName '' counts as default", pod("payments", ""), with_default, True),
    ("a service account with dots (payments/api.v2) matches its own key", pod("payments", "api.v2"), with_dots, True),
    ("payments/api does not match the key payments.api.v2", pod("payments", "api"), with_dots, False),
    ("a params ConfigMap without data matches nothing, without an error", pod("payments", "api"), empty, False),
]
for what, p, param, expected in cases:
    try:
        got = matches(p, param)
        check(got == expected, f"matchConditions: {what}", f"got {got}")
    except (CELEvalError, TypeNotDeclared, Exception) as e:  # an error here would refuse every pod
        check(False, f"matchConditions: {what}", f"evaluation error: {e}")

# --- Mutations --------------------------------------------------------------------------------


def run_policy(p, param, spec=spec):
    """Every mutation in order, as the API server applies them; returns the mutated pod."""
    context = {"object": p, "oldObject": None, "request": request(p), "params": param, "namespaceObject": {"metadata": {"name": p["metadata"]["namespace"]}}}
    variables = celtypes.MapType()
    for v in spec.get("variables", []):
        variables[celtypes.StringType(v["name"])] = evaluate(PLAIN, v["expression"], {**context, "variables": variables})
    current = omit_empty(copy.deepcopy(p))
    for i, m in enumerate(spec["mutations"]):
        ctx = {**context, "object": current, "variables": variables}
        if m["patchType"] == "JSONPatch":
            ops = evaluate(MUTATING, m["jsonPatch"]["expression"], ctx)
            for op in ops:
                if not (isinstance(op, Typed) and op.type_name == "JSONPatch"):
                    raise AssertionError(f"mutation {i}: not a JSONPatch: {op!r}")
                value = op.get(celtypes.StringType("value"))
                if isinstance(value, Typed):
                    errors = type_name_errors(value, [value.type_name])
                    if errors:
                        raise AssertionError(f"mutation {i}: Object type names do not follow the field path: {errors}")
            patched = copy.deepcopy(current)
            for op in native(ops):
                json_patch_add(patched, op)
        else:
            result = evaluate(MUTATING, m["applyConfiguration"]["expression"], ctx)
            if not (isinstance(result, Typed) and result.type_name == "Object"):
                raise AssertionError(f"mutation {i}: an apply configuration must be an Object{{}}: {result!r}")
            errors = type_name_errors(result, ["Object"])
            if errors:
                raise AssertionError(f"mutation {i}: Object type names do not follow the field path: {errors}")
            config = native(result)
            found = atomics(config, POD)
            if found:
                raise AssertionError(f"mutation {i}: apply configuration holds atomic fields the API server refuses: {found}")
            patched = merge(current, config, POD)
        current = omit_empty(patched)
    return current


def containers_of(p):
    return p["spec"]["containers"] + p["spec"].get("initContainers", [])


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def assert_injected(p, keep=None):
    """Every container has both variables (or its own), the mount once, the volume once."""
    keep = keep or {}
    problems = []
    volumes = [v for v in p["spec"].get("volumes", []) if v["name"] == "eks-pod-identity-token"]
    if volumes != [EXPECTED_VOLUME]:
        problems.append(f"volume: {volumes}")
    for c in containers_of(p):
        env = env_of(c)
        names = [e["name"] for e in c.get("env", [])]
        if len(names) != len(set(names)):
            problems.append(f"{c['name']}: duplicate env {names}")
        for name, value in EXPECTED_ENV.items():
            want = keep.get((c["name"], name), {"name": name, "value": value})
            if env.get(name) != want:
                problems.append(f"{c['name']}: {name} is {env.get(name)}, want {want}")
        mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == TOKEN_DIR]
        want_mount = keep.get((c["name"], "mount"), EXPECTED_MOUNT)
        if mounts != [want_mount]:
            problems.append(f"{c['name']}: mounts at {TOKEN_DIR}: {mounts}")
    return problems


def schema_errors(p):
    try:
        kubernetes_validate.validate(p, VERSION, strict=True)
        return []
    except Exception as e:  # kubernetes_validate.ValidationError and friends
        return [str(getattr(e, "message", e))]


api_access = {"name": "kube-api-access-x", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}
own_uri = {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://127.0.0.1:9999/creds"}
own_file = {"name": "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
own_mount = {"name": "mine", "mountPath": TOKEN_DIR, "readOnly": True}

scenarios = [
    (
        "two containers and an init container, the usual kube-api-access volume",
        pod(
            "payments",
            "api",
            containers=[
                {"name": "app", "image": "app:1", "env": [{"name": "LOG", "value": "debug"}], "volumeMounts": [{"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}]},
                {"name": "proxy", "image": "proxy:1"},
            ],
            init_containers=[{"name": "migrate", "image": "migrate:1"}],
            volumes=[api_access],
        ),
        {},
    ),
    ("no volumes and no init containers (automountServiceAccountToken: false)", pod("payments", "api"), {}),
    (
        "a container's own values are kept (a value and a valueFrom)",
        pod("payments", "api", containers=[{"name": "app", "image": "app:1", "env": [own_uri, own_file]}, {"name": "other", "image": "o:1"}]),
        {("app", "AWS_CONTAINER_CREDENTIALS_FULL_URI"): own_uri, ("app", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"): own_file},
    ),
    (
        "something already mounted at the token directory is left alone",
        pod("payments", "api", containers=[{"name": "app", "image": "app:1", "volumeMounts": [own_mount]}], volumes=[{"name": "mine", "emptyDir": {}}]),
        {("app", "mount"): own_mount},
    ),
    (
        "a pod that already has the token volume does not get a second one",
        pod("payments", "api", volumes=[copy.deepcopy(EXPECTED_VOLUME)]),
        {},
    ),
]

for what, p, keep in scenarios:
    try:
        first = run_policy(p, params)
    except (CELEvalError, TypeNotDeclared, AssertionError, ValueError, KeyError, TypeError) as e:
        check(False, f"mutations: {what}", f"{type(e).__name__}: {e}")
        continue
    problems = assert_injected(first, keep)
    check(not problems, f"mutations: {what}: variables, mount and volume", "; ".join(problems))
    others = [v for v in first["spec"].get("volumes", []) if v["name"] != "eks-pod-identity-token"]
    before = [v for v in p["spec"].get("volumes", []) if v["name"] != "eks-pod-identity-token"]
    check(others == before, f"mutations: {what}: other volumes untouched", f"{others}")
    check(("initContainers" in first["spec"]) == ("initContainers" in p["spec"]), f"mutations: {what}: initContainers present only if they were")
    errors = schema_errors(first)
    check(not errors, f"mutations: {what}: the mutated pod passes the Pod schema (strict)", "; ".join(errors))
    again = run_policy(first, params)
    check(again == first, f"mutations: {what}: a second run (reinvocation) changes nothing", json.dumps(again)[:400])

# A container without env gets exactly the two variables, in the policy's order.
try:
    plain = run_policy(pod("payments", "api"), params)
    want = [{"name": k, "value": v} for k, v in EXPECTED_ENV.items()]
    check(plain["spec"]["containers"][0].get("env") == want, "mutations: the variables are added in a fixed order", f"{plain['spec']['containers'][0].get('env')}")
except (CELEvalError, TypeNotDeclared, AssertionError, ValueError, KeyError, TypeError) as e:
    check(False, "mutations: the variables are added in a fixed order", f"{type(e).__name__}: {e}")

# Reinvocation after another mutator added a container: it gets its share, nothing else moves.
try:
    first = run_policy(pod("payments", "api", volumes=[api_access]), params)
    with_sidecar = copy.deepcopy(first)
    with_sidecar["spec"]["containers"].append({"name": "mesh", "image": "mesh:1", "env": [{"name": "X", "value": "1"}]})
    second = run_policy(with_sidecar, params)
    mesh = next(c for c in second["spec"]["containers"] if c["name"] == "mesh")
    check(not assert_injected(second), "reinvocation: a container added by a later mutator gets the variables and mount", "; ".join(assert_injected(second)))
    check(env_of(mesh)["X"] == {"name": "X", "value": "1"}, "reinvocation: that container's own variables stay")
    check(second["spec"]["containers"][0] == first["spec"]["containers"][0] and second["spec"]["volumes"] == first["spec"]["volumes"], "reinvocation: the rest of the pod is unchanged")
except (CELEvalError, TypeNotDeclared, AssertionError, ValueError, KeyError, TypeError, StopIteration) as e:
    check(False, "reinvocation after a sidecar is added", f"{type(e).__name__}: {e}")

# The harness itself: it must see the mistakes it claims to catch.
try:
    bad = Typed({celtypes.StringType("spec"): Typed()})
    bad[celtypes.StringType("spec")].type_name = "Object.wrong"
    bad.type_name = "Object"
    check(type_name_errors(bad, ["Object"]) != [], "harness: a misnamed Object type is caught")
    check(atomics({"spec": {"volumes": [EXPECTED_VOLUME]}}, POD) == [".spec.volumes.projected.sources"], "harness: the token volume in an apply configuration is caught as atomic")
    try:
        evaluate(PLAIN, "Object{}", {})
        check(False, "harness: Object{} in a variable is refused")
    except TypeNotDeclared:
        check(True, "harness: Object{} in a variable is refused")
    # The volume as an apply configuration (the obvious way to write it) must be refused.
    as_apply = copy.deepcopy(spec)
    as_apply["mutations"][0] = {
        "patchType": "ApplyConfiguration",
        "applyConfiguration": {
            "expression": "Object{spec: Object.spec{volumes: [Object.spec.volumes{name: 'eks-pod-identity-token', "
            "projected: Object.spec.volumes.projected{sources: [Object.spec.volumes.projected.sources{"
            "serviceAccountToken: Object.spec.volumes.projected.sources.serviceAccountToken{path: 't'}}]}}]}}"
        },
    }
    try:
        run_policy(pod("payments", "api"), params, as_apply)
        check(False, "harness: a projected volume written as an apply configuration is refused")
    except AssertionError as e:
        check("atomic" in str(e), "harness: a projected volume written as an apply configuration is refused", str(e))
except Exception as e:  # noqa: BLE001
    check(False, "harness self-checks", f"{type(e).__name__}: {e}")

print()
print(NOT_CHECKED)
print()
if failures:
    print(f"check_policy.py: {len(failures)} of {len(passes) + len(failures)} checks FAILED:", file=sys.stderr)
    for f in failures:
        print(f"  - {f}", file=sys.stderr)
    sys.exit(1)
print(f"check_policy.py: all {len(passes)} checks passed")
