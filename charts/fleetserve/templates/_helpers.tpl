{{/* Names, labels and small derived values shared by every template. */}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "fleetserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The fully qualified name of the release's objects: fullnameOverride, else
<release>-<chart> (or just the release name when it already contains the chart
name). Truncated to 63 characters because some fields are DNS labels.
*/}}
{{- define "fleetserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator's objects are called <fullname>-operator. */}}
{{- define "fleetserve.operatorName" -}}
{{- printf "%s-operator" (include "fleetserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* chart label value: name-version. */}}
{{- define "fleetserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object of the release. */}}
{{- define "fleetserve.commonLabels" -}}
helm.sh/chart: {{ include "fleetserve.chart" . }}
app.kubernetes.io/name: {{ include "fleetserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleetserve
{{- end -}}

{{/* Labels on the operator's own objects (Deployment, RBAC, Service, ...). */}}
{{- define "fleetserve.labels" -}}
{{ include "fleetserve.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels that select the operator pods (immutable once installed). */}}
{{- define "fleetserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleetserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "fleetserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fleetserve.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false (name an existing ServiceAccount)" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator image, tag defaulting to the chart's appVersion; `latest` is refused. */}}
{{- define "fleetserve.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString -}}
{{- if eq $tag "latest" -}}
{{- fail "image.tag: `latest` is not allowed; pin a release tag (empty means the chart's appVersion)" -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* The namespaces the operator watches: watchNamespaces, or empty for all. */}}
{{- define "fleetserve.clusterWide" -}}
{{- if empty .Values.watchNamespaces -}}true{{- end -}}
{{- end -}}
