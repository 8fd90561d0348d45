{{/*
The chart name, capped at 63 characters (the DNS label limit of Kubernetes names).
*/}}
{{- define "podtally.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: "<release>-<chart>", or the release name alone when it already contains the
chart name; capped at 63 characters. Also the name of the Service (a DNS label) and of the
MutatingWebhookConfiguration the operator patches.
*/}}
{{- define "podtally.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"<chart>-<version>" for the helm.sh/chart label (label values are capped at 63 too).
*/}}
{{- define "podtally.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: the immutable subset used by the Deployment's selector, the Service, the
PodDisruptionBudget and the spread constraints. Never add mutable values (versions) here.
*/}}
{{- define "podtally.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podtally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Common labels on every object.
*/}}
{{- define "podtally.labels" -}}
helm.sh/chart: {{ include "podtally.chart" . }}
{{ include "podtally.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: podtally
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "podtally.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "podtally.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image, and the image injected into pods.
*/}}
{{- define "podtally.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "podtally.sidecarImage" -}}
{{- with .Values.injection.image }}
{{- printf "%s:%s" .repository (.tag | default $.Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The leader-election Lease.
*/}}
{{- define "podtally.leaseName" -}}
{{- .Values.operator.leaderElection.leaseName | default (printf "%s-operator" (include "podtally.fullname" .)) }}
{{- end }}

{{/*
The webhook serving certificate (cert-manager) and its Secret.
*/}}
{{- define "podtally.webhookCertName" -}}
{{- printf "%s-webhook" (include "podtally.fullname" .) }}
{{- end }}

{{- define "podtally.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "podtally.fullname" .) }}
{{- end }}

{{/*
Namespaces never injected: the configured ones plus the release namespace.
*/}}
{{- define "podtally.excludedNamespaces" -}}
{{- $excluded := concat .Values.webhook.excludedNamespaces (list .Release.Namespace) | uniq }}
{{- toJson $excluded }}
{{- end }}

{{/*
The operator's --injection-config file: exactly the fields of
podtally.injection.render.InjectionConfig (which forbids unknown ones).
*/}}
{{- define "podtally.injectionConfig" -}}
{{- with .Values.injection -}}
image: {{ include "podtally.sidecarImage" $ | quote }}
image_pull_policy: {{ .image.pullPolicy | quote }}
native_sidecar: {{ .nativeSidecar }}
proxy_uid: {{ .proxyUid }}
proxy_port: {{ .proxyPort }}
metrics_port: {{ .metricsPort }}
redirect_ports: {{ toJson .redirectPorts }}
exclude_cidrs: {{ toJson .excludeCidrs }}
team_labels: {{ toJson $.Values.attribution.teamLabels }}
llm_hosts: {{ toJson .llmHosts }}
drain_timeout: {{ .drainTimeout }}
ca_secret: {{ .caSecretName | quote }}
trust_bundle: {{ .trustBundleName | quote }}
sidecar_resources: {{ toJson .sidecarResources }}
init_resources: {{ toJson .initResources }}
{{- end }}
{{- end }}
